// Calls to the explorer's JSON endpoints. Errors come back as {detail}; they are thrown as Error(detail).

export function url(path, params = {}) {
  const query = Object.entries(params)
    .filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`)
    .join("&");
  return query ? `${path}?${query}` : path;
}

export async function getJSON(path, params = {}, signal = undefined) {
  const response = await fetch(url(path, params), { signal });
  const body = await response.json();
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

export const imageUrl = (store, row, size, crop) =>
  url(`/api/stores/${store}/samples/${row}/image.png`, { size, crop });
