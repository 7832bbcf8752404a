// Colour maps on canvases: one canvas pixel per token, coloured from the server's 256-step table
// (entry round((v - vmin) / (vmax - vmin) * 255)); the page's tests read these pixels back.

export function colorIndex(value, vmin, vmax, steps) {
  const span = vmax - vmin;
  const i = span > 0 ? Math.round(((value - vmin) / span) * (steps - 1)) : 0;
  return Math.min(steps - 1, Math.max(0, i));
}

// Draw an H×W array of values onto `canvas` (resized to W×H pixels, opaque).
export function paintMap(canvas, values, vmin, vmax, lut) {
  const h = values.length, w = values[0].length;
  canvas.width = w;
  canvas.height = h;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(w, h);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const [r, g, b] = lut[colorIndex(values[y][x], vmin, vmax, lut.length)];
      const o = 4 * (y * w + x);
      image.data[o] = r; image.data[o + 1] = g; image.data[o + 2] = b; image.data[o + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}

export function clearCanvas(canvas) {
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

export function paintBar(canvas, lut) {
  canvas.width = lut.length;
  canvas.height = 1;
  const ctx = canvas.getContext("2d");
  lut.forEach(([r, g, b], i) => { ctx.fillStyle = `rgb(${r},${g},${b})`; ctx.fillRect(i, 0, 1, 1); });
}

// Outline token boxes on a canvas that shows an H×W map: boxes [{y, x, size}], in token units.
export function outline(canvas, shape, boxes, color, dashed = false) {
  const ctx = canvas.getContext("2d");
  const sy = canvas.height / shape[0], sx = canvas.width / shape[1];
  ctx.strokeStyle = color;
  ctx.lineWidth = 2;
  ctx.setLineDash(dashed ? [4, 3] : []);
  for (const b of boxes) ctx.strokeRect(b.x * sx + 1, b.y * sy + 1, (b.size || 1) * sx - 2, (b.size || 1) * sy - 2);
  ctx.setLineDash([]);
}
