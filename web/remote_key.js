// AuraFlow editor extension: a small dialog that stores the API keys of AuraFlow Remote Generate's providers
// (Segmind, fal).
//
// The key goes straight to the pack's route (POST /auraflow/remote/key with {key, provider}, nodes/routes.py),
// which writes <ComfyUI user dir>/auraflow/segmind_api_key or fal_key. It is never a widget, never a ComfyUI setting
// (settings are saved and served in plain text), never part of a workflow or prompt, and the route never sends it
// back: the dialog only learns whether a key is configured and where it comes from. Open it from the node's
// right-click menu ("Set remote API key (Segmind, fal)…") or from Extensions › AuraFlow in the menu bar.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const ROUTE = "/auraflow/remote/key";
const NODE_ID = "AuraFlowRemoteGenerate";
const COMMAND_ID = "AuraFlow.SetSegmindApiKey";  // the id kept, so keybindings made before still work
const LABEL = "Set remote API key (Segmind, fal)…";
const PROVIDERS = {
  segmind: { label: "Segmind", placeholder: "SG_…" },
  fal: { label: "fal", placeholder: "key id:secret" },
};

async function keyStatus() {
  const resp = await api.fetchApi(ROUTE);
  return resp.json();
}

async function saveKey(key, provider) {
  const resp = await api.fetchApi(ROUTE, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ key, provider }),
  });
  const body = await resp.json();
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function describe(all, provider) {
  const status = (all.providers || {})[provider] || all;
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
  const title = el("h3", { margin: "0 0 8px" }, "API key for AuraFlow Remote Generate");
  const choice = el("select", { marginBottom: "8px", padding: "4px" });
  for (const [name, p] of Object.entries(PROVIDERS)) {
    const option = el("option", {}, p.label);
    option.value = name;
    choice.append(option);
  }
  const info = el("p", { margin: "0 0 8px", fontSize: "13px" }, "Checking…");
  const input = el("input", { width: "100%", boxSizing: "border-box", padding: "6px" });
  input.type = "password";  // not shown, and browsers do not offer to autofill it into other fields
  input.autocomplete = "off";
  input.placeholder = PROVIDERS.segmind.placeholder;
  const message = el("p", { minHeight: "1.2em", margin: "8px 0", fontSize: "13px" });
  const buttons = el("div", { display: "flex", gap: "8px", justifyContent: "flex-end" });
  const save = el("button", {}, "Save");
  const remove = el("button", {}, "Remove key file");
  const close = el("button", {}, "Close");
  buttons.append(remove, close, save);
  dialog.append(title, choice, info, input, message, buttons);
  document.body.append(dialog);

  const refresh = async () => {
    try {
      info.textContent = describe(await keyStatus(), choice.value);
    } catch (err) {
      info.textContent = `Could not ask the server: ${err.message}`;
    }
  };
  const submit = async (key) => {
    message.textContent = "Saving…";
    try {
      info.textContent = describe(await saveKey(key, choice.value), choice.value);
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
  choice.onchange = () => {
    input.value = "";
    message.textContent = "";
    input.placeholder = PROVIDERS[choice.value].placeholder;
    refresh();
  };
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
  commands: [{ id: COMMAND_ID, label: LABEL, function: openKeyDialog }],
  menuCommands: [{ path: ["Extensions", "AuraFlow"], commands: [COMMAND_ID] }],
  // the node's right-click menu, through the frontend's hook (no LiteGraph prototype is patched)
  getNodeMenuItems(node) {
    const type = node?.constructor?.comfyClass ?? node?.type;
    return type === NODE_ID ? [{ content: LABEL, callback: () => openKeyDialog() }] : [];
  },
});
