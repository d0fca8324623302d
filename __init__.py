"""ComfyUI-AuraFlow: AuraFlow text-to-image nodes (local model and hosted API) for ComfyUI.

ComfyUI imports this folder as a package (custom_nodes/<pack>/ itself is not on sys.path), so everything here is
reached by relative imports: the nodes as ``.nodes`` and the engine they use as ``.aura_flow``. Relative imports
always find this pack's own engine, never another copy (a pip-installed ``aura_flow`` of another version, or a
module of the same name in another pack), and add nothing to sys.path. Tests import the folder the same way
(tests/workflow_exec.py: ``load_pack()``).

Importing is cheap: no torch, diffusers or transformers until a node runs.
"""
WEB_DIRECTORY = "./web"

# pytest (importlib mode) imports this file on its own, with no package, when the checkout's folder name is not a
# Python name ("ComfyUI-AuraFlow"): there is nothing to register then, and relative imports cannot work.
if __package__:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .nodes import routes as _routes

    _routes.register()  # the editor's HTTP routes, all of them; added only when ComfyUI's server is running

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
