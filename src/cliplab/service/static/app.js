// cliplab search page: text search, image search (drop or file picker), optional zero-shot labels.
"use strict";

const $ = (id) => document.getElementById(id);

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function k() {
  const value = parseInt($("k").value, 10);
  return Number.isFinite(value) ? value : 20;
}

async function call(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (err) {
    throw new Error("the service cannot be reached: " + err.message);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (err) {
    body = null;
  }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return body;
}

function render(hits, what) {
  const grid = $("results");
  grid.replaceChildren();
  $("query-info").textContent = `${hits.length} results for ${what}`;
  for (const hit of hits) {
    const tile = document.createElement("figure");
    tile.className = "tile";
    tile.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.url;
    img.alt = hit.caption || hit.name || `image ${hit.id}`;
    img.loading = "eager";
    img.title = "search with this image";
    img.addEventListener("click", () => searchById(hit.id));
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const text = document.createElement("span");
    text.className = "caption";
    text.textContent = hit.caption || hit.name || "";
    caption.append(score, text);
    tile.append(img, caption);
    grid.append(tile);
  }
}

async function searchText(query) {
  clearError();
  if (!query.trim()) {
    showError("Type some words to search for.");
    return;
  }
  try {
    const body = await call(`/search?q=${encodeURIComponent(query)}&k=${k()}`);
    render(body.hits, `"${query}"`);
  } catch (err) {
    showError(err.message);
  }
}

async function classify(file) {
  const labels = $("labels").value.trim();
  const list = $("classes");
  list.replaceChildren();
  list.hidden = true;
  if (!labels) return;
  const form = new FormData();
  form.append("image", file, file.name || "query");
  form.append("labels", labels);
  const body = await call("/classify", { method: "POST", body: form });
  for (const p of body.predictions) {
    const item = document.createElement("li");
    item.textContent = `${p.label}: ${(100 * p.probability).toFixed(1)}%`;
    list.append(item);
  }
  list.hidden = false;
}

async function searchImage(file) {
  clearError();
  const form = new FormData();
  form.append("image", file, file.name || "query");
  try {
    const body = await call(`/search/image?k=${k()}`, { method: "POST", body: form });
    render(body.hits, `image ${file.name || "query"}`);
    await classify(file);
  } catch (err) {
    showError(err.message);
  }
}

async function searchById(id) {
  try {
    const response = await fetch(`/images/${id}`);
    if (!response.ok) throw new Error(`image ${id}: ${response.status}`);
    const blob = await response.blob();
    await searchImage(new File([blob], `image-${id}`, { type: blob.type }));
  } catch (err) {
    showError(err.message);
  }
}

$("search-form").addEventListener("submit", (event) => {
  event.preventDefault();
  searchText($("q").value);
});

$("file").addEventListener("change", () => {
  const file = $("file").files[0];
  if (file) searchImage(file);
  $("file").value = "";
});

const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
}
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  const file = event.dataTransfer && event.dataTransfer.files[0];
  if (file) searchImage(file);
  else showError("Drop an image file.");
});

call("/healthz")
  .then((h) => { $("status").textContent = `${h.count} images, model ${h.model || h.model_id}, ${h.index_type} index`; })
  .catch((err) => showError(err.message));
