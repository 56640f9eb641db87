// The search page (common.js comes first).
async function call(path, body) {
  const response = await fetch(path, body ? { method: "POST", headers: headers(), body: JSON.stringify(body) }
                                          : { headers: headers() });
  const payload = await response.json();
  if (!response.ok) throw new Error(payload.error ? payload.error.message : response.statusText);
  return payload;
}

async function loadCollections() {
  try {
    const list = await call("/v1/collections");
    $("collection").replaceChildren(...list.data.map((c) => new Option(`${c.name} (${c.items})`, c.name)));
    status(list.data.length ? "" : "No collections yet: create one and add items (gateway index add).");
  } catch (error) { status(error.message, true); }
}

function card(hit) {
  const div = document.createElement("div");
  div.className = "card";
  div.dataset.id = hit.id;
  if (hit.metadata && hit.metadata.thumbnail) {
    const img = document.createElement("img");
    img.src = hit.metadata.thumbnail;
    img.alt = hit.id;
    div.append(img);
  } else {
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = (hit.metadata && (hit.metadata.caption || hit.metadata.text)) || hit.id;
    div.append(text);
  }
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = hit.score.toFixed(3);
  meta.append(score, " · " + hit.id);
  div.append(meta);
  return div;
}

$("search").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("image").files[0];
  const query = file ? { image_url: await readFile(file) } : { text: $("text").value };
  if (!file && !query.text.trim()) { status("Type a query or choose an image.", true); return; }
  status("Searching…");
  try {
    const started = performance.now();
    const result = await call("/v1/search", { collection: $("collection").value, query,
                                              top_k: Number($("topk").value) || 12 });
    $("results").replaceChildren(...result.data.map(card));
    status(`${result.data.length} results in ${Math.round(performance.now() - started)} ms`);
  } catch (error) { status(error.message, true); }
});
$("key").addEventListener("change", loadCollections);
loadCollections();
