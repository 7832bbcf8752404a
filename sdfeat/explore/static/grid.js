// The paged grid of thumbnails: id and label under each; unfinished rows greyed, failed ones marked; after a
// click on a token, each image's top-k most similar tokens are outlined on its thumbnail.

import { imageUrl } from "./api.js";
import { colorIndex } from "./colors.js";

export function renderGrid(container, storeIndex, page, selectedRow, onPick) {
  container.replaceChildren();
  for (const item of page.items) {
    const cell = document.createElement("div");
    cell.className = "cell" + (item.finished ? (item.ok ? "" : " failed") : " pending");
    if (item.row === selectedRow) cell.classList.add("selected");
    cell.dataset.row = item.row;
    cell.title = item.finished ? (item.ok ? item.id : `${item.id}: failed (${item.reason})`) : `${item.id}: not extracted yet`;
    const thumb = document.createElement("div");
    thumb.className = "thumb";
    if (!item.finished || item.ok) {
      const img = document.createElement("img");
      img.loading = "lazy";
      img.src = imageUrl(storeIndex, item.row, 100);
      img.alt = item.id;
      thumb.append(img);
    }
    const marks = document.createElement("canvas");
    marks.width = 100; marks.height = 100;
    thumb.append(marks);
    const caption = document.createElement("div");
    caption.className = "caption";
    const label = item.label_name ?? (item.label >= 0 ? item.label : "–");
    caption.textContent = `#${item.row} ${item.id} · ${label}`;
    cell.append(thumb, caption);
    if (item.finished && item.ok) cell.addEventListener("click", () => onPick(item.row));
    container.append(cell);
  }
}

// Outline each image's matches ({row, matches: [{y, x, similarity}]}) on its cell; best similarity as text.
export function showTopk(container, topk, lut) {
  const byRow = new Map(topk.images.map((im) => [im.row, im]));
  const [h, w] = topk.shape;
  for (const cell of container.querySelectorAll(".cell")) {
    const canvas = cell.querySelector("canvas");
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const image = byRow.get(Number(cell.dataset.row));
    if (!image) continue;
    const sx = canvas.width / w, sy = canvas.height / h;
    for (const m of image.matches) {
      const [r, g, b] = lut[colorIndex(m.similarity, -1, 1, lut.length)];
      ctx.fillStyle = `rgba(${r},${g},${b},0.8)`;
      ctx.fillRect(m.x * sx, m.y * sy, Math.max(sx, 3), Math.max(sy, 3));
      ctx.strokeStyle = "#f33";
      ctx.lineWidth = 1.5;
      ctx.strokeRect(m.x * sx - 1, m.y * sy - 1, Math.max(sx, 3) + 2, Math.max(sy, 3) + 2);
    }
    cell.title = `#${image.row} ${image.id}: best similarity ${image.matches[0].similarity.toFixed(3)}`;
  }
}

export function clearTopk(container) {
  for (const canvas of container.querySelectorAll(".cell canvas")) {
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  }
}
