"""The one door from nodes/ into ComfyUI. No other module of the pack imports ComfyUI's modules (``comfy.*``,
``folder_paths``, ``server``, ``latent_preview``); they ask this package, which answers with plain fallbacks
outside ComfyUI (tests, tools), so every node imports and runs without it.

Each function imports what it uses with a plain import inside itself (``import comfy.model_management as mm``,
``ImportError`` -> the fallback), so readers and static tools (comfy-import-guard) see every ComfyUI symbol the
pack touches, and tests can stand small fakes in ``sys.modules`` (a fake ``comfy`` package with them).

- `folders`: model folders, the output folder, save paths, the user folder, --disable-metadata;
- `devices`: ComfyUI's devices (where tensors live between nodes, the load device and dtype);
- `memory`: the pack's weights held by ComfyUI's ModelPatchers and loaded by its memory manager;
- `native`: sampling a ComfyUI ``MODEL`` that holds AuraFlow with ComfyUI's own guider;
- `progress`: the progress bar with latent previews, progress text, Cancel;
- `server`: adding HTTP routes to ComfyUI's server;
- `samplers`: ComfyUI's own sampler functions for names the engine lacks.
"""
