"""The hosted Aura Flow APIs: the client (`RemoteClient`), its key handling and its results.

Standard library HTTP only, no ComfyUI imports. client.py chooses the provider and API: Segmind's queue.py (v2:
submit, poll, fetch; the default) or sync.py (v1: one blocking request per image), or fal's queue, fal.py (the
protocol) with fal_params.py (what each fal model takes). calls.py, transport.py, answers.py, keys.py and
endpoint.py hold what they share (retries, cancel, the key rules, caps, address checks); providers.py names them.
"""
from .calls import RetryPolicy
from .client import MAX_FETCH, RemoteClient, check_request_ids, positive_seconds
from .endpoint import (API_URL_ENV, API_VERSION_ENV, API_VERSIONS, DEFAULT_API_URL, parse_endpoint,
                       resolve_api_version)
from .errors import MissingKeyError, RemoteError, RemoteInterrupted, RemoteTimeout
from .fal_params import NOISE_SOURCES, OPTION_DEFAULTS
from .keys import API_KEY_ENV, KEY_FILE_ENV, comfyui_key_file, default_key_file, resolve_api_key, save_api_key
from .providers import FAL, MODEL_NAMES, PROVIDER_NAMES, PROVIDERS, SEGMIND, check_model, get_provider
from .queue import PollPolicy
from .results import RemoteImage, RemoteResult, batch_seed

__all__ = ["RemoteClient", "RetryPolicy", "PollPolicy", "positive_seconds", "MAX_FETCH", "check_request_ids",
           "API_URL_ENV", "API_VERSION_ENV", "API_VERSIONS", "DEFAULT_API_URL", "parse_endpoint",
           "resolve_api_version", "MissingKeyError", "RemoteError", "RemoteInterrupted", "RemoteTimeout",
           "API_KEY_ENV", "KEY_FILE_ENV", "comfyui_key_file", "default_key_file", "resolve_api_key", "save_api_key",
           "RemoteImage", "RemoteResult", "batch_seed", "FAL", "SEGMIND", "PROVIDERS", "PROVIDER_NAMES", "MODEL_NAMES",
           "get_provider", "check_model", "NOISE_SOURCES", "OPTION_DEFAULTS"]
