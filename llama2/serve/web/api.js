// Talking to the server: its answers' errors explained, and a streamed answer's events.

// What an error answer means for the user, from its status and OpenAI-shaped body.
export function describe(status, body, context) {
  const error = body?.error ?? {};
  const said = error.message ? `: ${error.message}` : "";
  if (status === 401) {
    return `The server refused the API key (401)${said}. Enter the server's key under Settings.`;
  }
  if (status === 503) return `The server is busy (503)${said}. Try again in a moment.`;
  if (status === 400 && error.code === "context_length_exceeded") {
    const size = context ? ` of ${context} tokens` : "";
    return (
      `The conversation is too long for the model's context${size} (400)${said}. ` +
      "Start a new chat, or edit or delete earlier turns."
    );
  }
  if (status === 400) return `The server refused the request (400)${said}.`;
  if (status === 504) return `The answer took too long (504)${said}.`;
  return `The server answered ${status}${said}.`;
}

export async function errorBody(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

// The data of each server-sent event in the stream, as it arrives.
export async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value ?? new Uint8Array(), { stream: !done });
    const parts = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : parts.pop();
    for (const part of parts) {
      const data = part
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (data) yield data;
    }
    if (done) return;
  }
}
