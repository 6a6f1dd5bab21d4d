// The drop-images page of `imgarena serve`: each file is POSTed on its own to /predict and its
// top-k classes are drawn as bars. Text from the server and file names go in via textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
let authRequired = false;

function headers() {
  const token = $("token").value.trim();
  return authRequired && token ? { Authorization: "Bearer " + token } : {};
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function showRow(item, row) {
  const body = item.querySelector(".body");
  row.topk.forEach((t) => {
    const bar = el("div", "bar");
    bar.appendChild(el("span", "label", t.label));
    const track = el("span", "track");
    const fill = el("span", "fill");
    fill.style.width = (100 * t.prob).toFixed(1) + "%";
    track.appendChild(fill);
    bar.appendChild(track);
    bar.appendChild(el("span", "pct", (100 * t.prob).toFixed(1) + "%"));
    body.appendChild(bar);
  });
  item.dataset.label = row.label;
  item.dataset.state = "done";
}

function showError(item, message) {
  item.querySelector(".body").appendChild(el("div", "error", message));
  item.dataset.state = "error";
}

async function classify(file) {
  const item = el("li", "result");
  item.dataset.state = "pending";
  item.dataset.file = file.name;
  const img = el("img");
  img.alt = "";
  img.src = URL.createObjectURL(file);
  img.addEventListener("error", () => { img.hidden = true; }); // a non-image still gets the server's verdict
  item.appendChild(img);
  const body = el("div", "body");
  body.appendChild(el("div", "name", file.name));
  item.appendChild(body);
  $("results").prepend(item);

  const form = new FormData();
  form.append("file", file, file.name);
  try {
    const r = await fetch("/predict", { method: "POST", body: form, headers: headers() });
    const data = await r.json().catch(() => ({ error: "HTTP " + r.status + " (no JSON body)" }));
    if (r.ok) showRow(item, data.rows[0]);
    else showError(item, data.error || "HTTP " + r.status);
    if (r.status === 401) showTokenField();
  } catch (e) {
    showError(item, "request failed: " + e.message);
  }
}

async function handle(files) {
  const list = Array.from(files);
  $("message").textContent = list.length ? "classifying " + list.length + " image(s)..." : "";
  await Promise.all(list.map(classify));
  $("message").textContent = "";
}

function showTokenField() {
  authRequired = true;
  $("token-row").hidden = false;
}

async function loadInfo() {
  try {
    const health = await (await fetch("/health")).json();
    if (health.auth) showTokenField();
    const r = health.auth && !$("token").value.trim() ? null : await fetch("/info", { headers: headers() });
    if (r && r.ok) {
      const info = await r.json();
      $("model").textContent = info.model.name + " \u00b7 " + info.num_classes + " classes \u00b7 " +
        info.preprocessing.img_size + " px \u00b7 " + info.backend;
    } else {
      $("model").textContent = health.backend + " model (enter the token to see its details)";
    }
  } catch (e) {
    $("model").textContent = "model info unavailable: " + e.message;
  }
  document.body.dataset.status = "ready";
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("files").addEventListener("change", (e) => { handle(e.target.files); e.target.value = ""; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); handle(e.dataTransfer.files); });
  loadInfo();
});
