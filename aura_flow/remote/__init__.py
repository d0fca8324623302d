"""The hosted Aura Flow API (Segmind): the client (`RemoteClient`), its key handling and its results.

Standard library HTTP only, no ComfyUI imports. client.py chooses the API: queue.py (v2: submit, poll, fetch; the
default) or sync.py (v1: one blocking request per image); calls.py holds what they share (retries, cancel).
"""
from .calls import RetryPolicy
from .client import MAX_FETCH, RemoteClient, check_request_ids, positive_seconds
from .endpoint import (API_URL_ENV, API_VERSION_ENV, API_VERSIONS, DEFAULT_API_URL, parse_endpoint,
                       resolve_api_version)
from .errors import MissingKeyError, RemoteError, RemoteInterrupted, RemoteTimeout
from .keys import API_KEY_ENV, KEY_FILE_ENV, comfyui_key_file, default_key_file, resolve_api_key, save_api_key
from .queue import PollPolicy
from .results import RemoteImage, RemoteResult, batch_seed

__all__ = ["RemoteClient", "RetryPolicy", "PollPolicy", "positive_seconds", "MAX_FETCH", "check_request_ids",
           "API_URL_ENV", "API_VERSION_ENV", "API_VERSIONS", "DEFAULT_API_URL", "parse_endpoint",
           "resolve_api_version", "MissingKeyError", "RemoteError", "RemoteInterrupted", "RemoteTimeout",
           "API_KEY_ENV", "KEY_FILE_ENV", "comfyui_key_file", "default_key_file", "resolve_api_key", "save_api_key",
           "RemoteImage", "RemoteResult", "batch_seed"]
