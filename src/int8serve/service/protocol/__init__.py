"""The HTTP API's request bodies as pydantic models, and how bodies are read and their errors worded.

* `body.py` — bytes → JSON (bounded), Workers AI's wording for schema and model errors;
* `run.py` — the Workers AI `/ai/run` body, a model per card built from the card's JSON Schema;
* `openai.py` — the OpenAI `chat/completions` and `completions` bodies, checked again as Workers AI bodies;
* `answers.py` — the answers, for the OpenAPI document.
"""
