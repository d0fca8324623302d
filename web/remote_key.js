// AuraFlow editor extension: a small dialog that stores the Segmind API key for AuraFlow Remote Generate.
//
// The key goes straight to the pack's route (POST /auraflow/remote/key, nodes/remote_routes.py), which writes
// <ComfyUI user dir>/auraflow/segmind_api_key. It is never a widget, never a ComfyUI setting (settings are saved
// and served in plain text), never part of a workflow or prompt, and the route never sends it back: the dialog
// only learns whether a key is configured and where it comes from. Open it from the node's right-click menu
// ("Set Segmind API key…") or from Extensions › AuraFlow in the menu bar.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/auraflow/remote/key";
const NODE_ID = "AuraFlowRemoteGenerate";
const COMMAND_ID = "AuraFlow.SetSegmindApiKey";

async function keyStatus() {
  const resp = await api.fetchApi(ROUTE);
  return resp.json();
}

async function saveKey(key) {
  const resp = await api.fetchApi(ROUTE, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ key }),
  });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function describe(status) {
  if (status.source === "environment") {
    return `A key is set in the ${status.env} environment variable; it takes precedence over the key file.`;
  }
  if (status.source === "file") return `A key is stored in ${status.path}.`;
  return `No key yet. It will be stored in ${status.path} (or set ${status.env} before starting ComfyUI).`;
}

function el(tag, style, text) {
  const node = document.createElement(tag);
  Object.assign(node.style, style || {});
  if (text) node.textContent = text;
  return node;
}

async function openKeyDialog() {
  const dialog = el("dialog", { padding: "16px", minWidth: "420px", borderRadius: "8px", border: "1px solid #555",
                                background: "#222", color: "#ddd", fontFamily: "sans-serif" });
  const title = el("h3", { margin: "0 0 8px" }, "Segmind API key for AuraFlow Remote Generate");
  const info = el("p", { margin: "0 0 8px", fontSize: "13px" }, "Checking…");
  const input = el("input", { width: "100%", boxSizing: "border-box", padding: "6px" });
  input.type = "password";  // not shown, and browsers do not offer to autofill it into other fields
  input.autocomplete = "off";
  input.placeholder = "SG_…";
  const message = el("p", { minHeight: "1.2em", margin: "8px 0", fontSize: "13px" });
  const buttons = el("div", { display: "flex", gap: "8px", justifyContent: "flex-end" });
  const save = el("button", {}, "Save");
  const remove = el("button", {}, "Remove key file");
  const close = el("button", {}, "Close");
  buttons.append(remove, close, save);
  dialog.append(title, info, input, message, buttons);
  document.body.append(dialog);

  const refresh = async () => {
    try {
      info.textContent = describe(await keyStatus());
    } catch (err) {
      info.textContent = `Could not ask the server: ${err.message}`;
    }
  };
  const submit = async (key) => {
    message.textContent = "Saving…";
    try {
      info.textContent = describe(await saveKey(key));
      message.textContent = key ? "Saved." : "Removed.";
      input.value = "";
    } catch (err) {
      message.textContent = err.message;  // the server's message never contains the key
    }
  };
  save.onclick = () => input.value.trim() && submit(input.value.trim());
  input.onkeydown = (e) => e.key === "Enter" && save.onclick();
  remove.onclick = () => submit("");
  close.onclick = () => dialog.close();
  dialog.addEventListener("close", () => {
    input.value = "";
    dialog.remove();
  });
  dialog.showModal();
  input.focus();
  await refresh();
}

app.registerExtension({
  name: "AuraFlow.RemoteKey",
  commands: [{ id: COMMAND_ID, label: "Set Segmind API key…", function: openKeyDialog }],
  menuCommands: [{ path: ["Extensions", "AuraFlow"], commands: [COMMAND_ID] }],
  // the node's right-click menu, through the frontend's hook (no LiteGraph prototype is patched)
  getNodeMenuItems(node) {
    const type = node?.constructor?.comfyClass ?? node?.type;
    return type === NODE_ID ? [{ content: "Set Segmind API key…", callback: () => openKeyDialog() }] : [];
  },
});
