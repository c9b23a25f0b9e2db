"""int8serve: a self-hosted Llama-2-7B-chat int8 inference server speaking the Workers AI HTTP API."""

__version__ = "0.1.0"
