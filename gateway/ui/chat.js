// The chat page: the gateway's own /v1/chat/completions, streamed, with the key the user types (as the search
// page). Multi-turn conversation lives here; Stop aborts the request, and the gateway then aborts the replica's.
// common.js comes first.
const conversation = [];
let running = null;

function bubble(role, text, images) {
  const div = document.createElement("div");
  div.className = "turn " + role;
  div.textContent = text;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url;  // data URLs or the gateway's own origin only (the page's Content-Security-Policy)
    img.alt = "attached image";
    div.append(img);
  }
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function errorMessage(response) {
  try {
    const payload = await response.json();
    return payload.error ? payload.error.message : response.statusText;
  } catch (_) { return response.statusText || "HTTP " + response.status; }
}

async function loadModels() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (!response.ok) throw new Error(await errorMessage(response));
    const models = (await response.json()).data.filter((m) => !m.id.startsWith("clip-"));
    const chosen = $("model").value;
    $("model").replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === chosen)) $("model").value = chosen;
    status(models.length ? "" : "No chat models are configured.");
  } catch (error) { status(error.message, true); }
}

// "Ground in collection": the caller's collections; the gateway searches the chosen one with each turn and puts
// the hits in the prompt (the `retrieval` field), and the stream's last chunk says which it used.
async function loadCollections() {
  try {
    const response = await fetch("/v1/collections", { headers: headers() });
    if (!response.ok) return;  // no search here, or the key may not read: grounding stays off
    const names = (await response.json()).data.filter((c) => c.state === "ready").map((c) => c.name);
    const chosen = $("ground").value;  // kept across reloads (each key change lists again)
    $("ground").replaceChildren(new Option("no grounding", ""), ...names.map((n) => new Option("ground in " + n, n)));
    if (names.includes(chosen)) $("ground").value = chosen;
  } catch (_) { /* the chat works without it */ }
}

function sources(before, retrieval) {
  const div = document.createElement("div");
  div.className = "sources";
  const label = document.createElement("span");
  label.textContent = retrieval.data.length ? "From " + retrieval.collection + ":" : "Nothing in " + retrieval.collection + " matched.";
  div.append(label);
  for (const hit of retrieval.data) {
    const figure = document.createElement(hit.thumbnail ? "img" : "span");
    if (hit.thumbnail) figure.src = hit.thumbnail;  // a data URL from the item's metadata
    figure.title = hit.id + " (" + hit.score.toFixed(3) + ")";
    if (!hit.thumbnail) figure.textContent = hit.id;
    figure.className = "source";
    div.append(figure);
  }
  before.before(div);
}

async function userContent() {
  const parts = [];
  const text = $("message").value;
  if (text.trim()) parts.push({ type: "text", text });
  const shown = [];
  for (const file of $("images").files) {
    const url = await readFile(file);
    parts.push({ type: "image_url", image_url: { url } });
    shown.push(url);
  }
  const remote = $("image-url").value.trim();
  if (remote) parts.push({ type: "image_url", image_url: { url: remote } });  // the gateway fetches it
  const video = $("video").files[0];
  if (video) parts.push({ type: "video_url", video_url: { url: await readFile(video) } });
  return { parts, shown, text };
}

// SSE frames from the fetch body: "data: {json}\n\n"; an error event carries {"error": {...}}.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function extraParameters() {
  const raw = $("params").value.trim();
  if (!raw) return {};
  const parsed = JSON.parse(raw);  // a SyntaxError is shown as the reason
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed)) {
    throw new Error("Parameters must be a JSON object.");
  }
  return parsed;
}

async function send(event) {
  event.preventDefault();
  if (running) return;
  let extra;
  try { extra = extraParameters(); } catch (error) { status("More parameters: " + error.message, true); return; }
  const { parts, shown, text } = await userContent();
  if (!parts.length) { status("Type a message or attach an image.", true); return; }
  conversation.push({ role: "user", content: parts });
  bubble("user", text, shown);
  $("message").value = ""; $("images").value = ""; $("image-url").value = ""; $("video").value = "";
  const answer = bubble("assistant", "");
  running = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  status("…");
  let reply = "";
  const body = { ...extra, model: $("model").value, messages: conversation, stream: true,
                 max_tokens: Number($("max").value) || 256 };
  if ($("ground").value) {
    body.retrieval = { collection: $("ground").value, top_k: Number($("ground-k").value) || 3 };
    if ($("ground-images").checked) body.retrieval.kind = "image";  // `gateway index add` tags image items so
  }
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: running.signal, body: JSON.stringify(body),
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.retrieval) sources(answer, chunk.retrieval);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) { reply += delta.content; answer.textContent = reply; }
    }
    status("");
  } catch (error) {
    if (error.name === "AbortError") status("Stopped.");
    else { answer.className = "turn error"; answer.textContent = error.message; status(error.message, true); }
  } finally {
    if (reply) conversation.push({ role: "assistant", content: reply });
    else if (answer.className !== "turn error") answer.remove();
    if (!reply) conversation.pop();  // nothing came back: the turn can be sent again
    running = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("compose").addEventListener("submit", send);
$("stop").addEventListener("click", () => running && running.abort());
$("clear").addEventListener("click", () => { conversation.length = 0; $("log").replaceChildren(); status(""); });
$("key").addEventListener("change", () => { loadModels(); loadCollections(); });
loadModels();
loadCollections();
