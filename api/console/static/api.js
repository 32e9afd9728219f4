// The console's only way to the server: fetch with the admin token as a bearer header.
// The token lives in this tab's sessionStorage; it is never put in a URL, a cookie or a log.

const TOKEN_KEY = 'ktl.console.token';

export const session = {
  token: () => sessionStorage.getItem(TOKEN_KEY),
  signIn: (token) => sessionStorage.setItem(TOKEN_KEY, token),
  signOut: () => sessionStorage.removeItem(TOKEN_KEY),
};

/** A refusal from the API: its status, its machine-readable reason and its sentence. */
export class ApiError extends Error {
  constructor(status, reason, message, body) {
    super(message);
    this.status = status;
    this.reason = reason;
    this.body = body || {};
  }

  describe() {
    return this.status ? `${this.status} ${this.reason}: ${this.message}` : this.message;
  }
}

let unauthorized = () => {};

/** Called when the stored token is refused (401): the console signs out. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

async function send(path, { method = 'GET', json, token = session.token() } = {}) {
  const headers = { Accept: 'application/json' };
  if (token) headers.Authorization = `Bearer ${token}`;
  let body;
  if (json !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body, cache: 'no-store', credentials: 'omit' });
  } catch {
    throw new ApiError(0, 'unreachable', 'the server did not answer');
  }
  if (!response.ok) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      // not the API's JSON error shape (e.g. a proxy's page)
    }
    const refusal = new ApiError(
      response.status,
      error.reason || `http_${response.status}`,
      error.message || response.statusText,
      error,
    );
    if (response.status === 401 && token && token === session.token()) unauthorized(refusal);
    throw refusal;
  }
  return response;
}

export async function getJSON(path, options) {
  const response = await send(path, options);
  return response.status === 204 ? null : response.json();
}

export const postJSON = (path, json) => getJSON(path, { method: 'POST', json: json ?? {} });
export const deleteJSON = (path) => getJSON(path, { method: 'DELETE' });
export const getBlob = async (path) => (await send(path)).blob();

/** A public probe (/readyz answers 503 with a JSON body while not ready). */
export async function probe(path) {
  try {
    const response = await fetch(path, { cache: 'no-store', credentials: 'omit' });
    const text = await response.text();
    return { status: response.status, text };
  } catch {
    return { status: 0, text: '' };
  }
}

/** Path segments are ids from the server, but encode them anyway. */
export const seg = (value) => encodeURIComponent(String(value));
