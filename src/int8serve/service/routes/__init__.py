"""The app's routers: one per API (`workers_ai.py`, `openai.py`) and one for operations (`ops.py`)."""
