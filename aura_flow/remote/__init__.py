"""The hosted Aura Flow API (Segmind): the client (`RemoteClient`), its key handling and its results.

Standard library HTTP only, no ComfyUI imports; see client.py for the behaviour (retries, billing, cancel).
"""
from .client import RemoteClient, RetryPolicy
from .endpoint import API_URL_ENV, DEFAULT_API_URL, parse_endpoint
from .errors import MissingKeyError, RemoteError, RemoteInterrupted, RemoteTimeout
from .keys import API_KEY_ENV, KEY_FILE_ENV, comfyui_key_file, default_key_file, resolve_api_key, save_api_key
from .results import RemoteImage, RemoteResult, batch_seed

__all__ = ["RemoteClient", "RetryPolicy", "API_URL_ENV", "DEFAULT_API_URL", "parse_endpoint", "MissingKeyError",
           "RemoteError", "RemoteInterrupted", "RemoteTimeout", "API_KEY_ENV", "KEY_FILE_ENV", "comfyui_key_file",
           "default_key_file", "resolve_api_key", "save_api_key", "RemoteImage", "RemoteResult", "batch_seed"]
