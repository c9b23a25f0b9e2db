// int8serve playground: chat with the served models through this server's public Workers AI routes.
//
// Why this file exists: it is the whole client of the playground page (no framework, no build step). It
// finds the token's account (GET /client/v4/accounts), lists the served models (models/search), bounds the
// sampling inputs with the model card's schema (models/schema), streams answers from POST .../ai/run/{model}
// (server-sent events) and shows each answer's tokens, time to first token, tokens/s and neurons.
//
// Rules: the token lives in memory (or localStorage when the user asks) and is sent only in the Authorization
// header of requests to this origin. Every URL is relative to the page's, so that the page also works behind a
// reverse proxy that serves the server under a path prefix (https://example.com/int8serve/). Text from the API
// or the model is only ever inserted with textContent / append(string), never parsed as HTML.
"use strict";

(() => {
  const API_BASE = new URL("client/v4", document.baseURI).href; // the page is at the server's root
  const TOKEN_STORAGE_KEY = "int8serve.playground.token";
  const TOKEN_PATTERN = /^[\x21-\x7e]+$/; // what the server accepts: visible ASCII, no spaces
  const PARAMETER_NAMES = ["max_tokens", "temperature", "top_p", "top_k", "seed", "repetition_penalty",
    "frequency_penalty", "presence_penalty"];

  const byId = (id) => document.getElementById(id);
  const ui = {
    connectForm: byId("connect-form"),
    token: byId("token"),
    rememberToken: byId("remember-token"),
    connect: byId("connect"),
    connectStatus: byId("connect-status"),
    model: byId("model"),
    modelDescription: byId("model-description"),
    systemPrompt: byId("system-prompt"),
    history: byId("history"),
    emptyHistory: byId("empty-history"),
    compose: byId("compose"),
    message: byId("message"),
    send: byId("send"),
    stop: byId("stop"),
    newChat: byId("new-chat"),
    composeStatus: byId("compose-status"),
  };
  // the ranges this server enforces for parameters a card's schema does not describe (inlined by the server)
  const serverRanges = JSON.parse(byId("server-parameter-ranges").textContent);

  const state = {
    token: "",
    account: "",
    models: new Map(), // name -> models/search entry
    limits: {}, // parameter -> {type, minimum, maximum, default}
    history: [], // the conversation sent with each request (without the system prompt)
    controller: null, // the AbortController of the answer being streamed
    limitsRequest: 0, // the number of the latest models/schema request: only its answer sets the limits
    connecting: false,
  };

  /** An error worth showing to a person: `message` is a sentence, `detail` the API's own code and words. */
  class PlaygroundError extends Error {
    constructor(message, detail = "") {
      super(message);
      this.name = "PlaygroundError";
      this.detail = detail;
    }
  }

  // --- talking to the API ---------------------------------------------------------------------------------------

  function accountBase() {
    return `${API_BASE}/accounts/${encodeURIComponent(state.account)}/ai`;
  }

  function runUrl(model) {
    return `${accountBase()}/run/${model.split("/").map(encodeURIComponent).join("/")}`;
  }

  async function apiFetch(path, options = {}) {
    const headers = new Headers(options.headers || {});
    headers.set("Authorization", `Bearer ${state.token}`);
    let response;
    try {
      response = await fetch(path, {
        ...options, headers, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
      });
    } catch (err) {
      if (err && err.name === "AbortError") throw err;
      throw new PlaygroundError("Cannot reach the server. Is it still running?", String((err && err.message) || err));
    }
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  async function apiResult(path) {
    const response = await apiFetch(path);
    try {
      return (await response.json()).result;
    } catch {
      throw new PlaygroundError(`The server's answer to ${path} is not JSON.`);
    }
  }

  async function errorFromResponse(response) {
    let text = "";
    try {
      text = await response.text();
    } catch {
      // the body is unreadable: the status alone must do
    }
    let envelope = null;
    try {
      envelope = JSON.parse(text);
    } catch {
      envelope = null;
    }
    const first = envelope && Array.isArray(envelope.errors) ? envelope.errors[0] : null;
    if (!first || typeof first !== "object") {
      return new PlaygroundError(`The server answered HTTP ${response.status}.`, text.slice(0, 200));
    }
    return new PlaygroundError(explainError(response.status, first.code, response.headers),
      `HTTP ${response.status}, code ${first.code}: ${first.message}`);
  }

  /** A readable sentence for an API error code (Cloudflare's envelope, workers-ai-contract.md §3). */
  function explainError(status, code, headers) {
    const header = (name) => (headers ? headers.get(name) : null);
    switch (code) {
      case 3021: {
        const limit = header("x-ratelimit-limit-requests");
        const retry = header("retry-after");
        const rule = limit
          ? `this account may send ${limit} ${limit === "1" ? "request" : "requests"} a minute to this model`
          : "too many requests a minute to this model";
        return `Rate limit reached: ${rule}.${retry ? ` Try again in ${retry} s.` : ""}`;
      }
      case 3036:
        return "This account has used up its daily allocation of neurons. It resets at 00:00 UTC.";
      case 3040:
        // 429: the account's share of the engine (policy/fairness.py) or a full engine, with the same answer
        return status === 503
          ? "The server is starting or shutting down. Try again in a moment."
          : "Too many requests at once: this account already has as many requests in progress as the server allows "
            + "it, or the server is full. Try again in a moment.";
      case 5021:
        return "The conversation is too long for the model's context window (prompt tokens + max_tokens). "
          + "Start a new chat, shorten the message or lower max_tokens.";
      case 5006:
        return "The server refused the request as invalid.";
      case 5007:
        return "This model is not served here. Reconnect to refresh the list of models.";
      case 3006:
        return "The request is too large. Start a new chat or shorten the message.";
      case 3008:
        return "The request was aborted.";
      case 9106:
        return "No API token was sent. Enter a token and connect.";
      case 6003:
        return "The Authorization header was malformed. Check the token.";
      case 10000:
        return status === 403
          ? "This token may not use that account."
          : "The API token was not recognised. Check it and connect again.";
      case 3043:
        return "The server failed while answering (internal error). Try again.";
      default:
        return status >= 500 ? "The server failed to answer." : "The request failed.";
    }
  }

  /** The `data` payloads of a server-sent event stream, as strings (including "[DONE]"). */
  async function* serverSentData(body) {
    const reader = body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await readChunk(reader);
        buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
        buffer = buffer.replace(/\r\n/g, "\n");
        let boundary;
        while ((boundary = buffer.indexOf("\n\n")) !== -1) {
          const event = buffer.slice(0, boundary);
          buffer = buffer.slice(boundary + 2);
          const lines = event.split("\n").filter((line) => line.startsWith("data:"));
          if (lines.length) yield lines.map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
        }
        if (done) return; // an unterminated last event is incomplete: dropped, as EventSource does
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /** The next chunk of a streamed answer; a connection lost mid-answer is our own error, said as a sentence. */
  async function readChunk(reader) {
    try {
      return await reader.read();
    } catch (err) {
      if (err && err.name === "AbortError") throw err; // Stop
      throw new PlaygroundError("The connection was lost while the answer streamed: the answer is incomplete. "
        + "Check that the server is running, then send the message again.", String((err && err.message) || err));
    }
  }

  /** A readable sentence for the error frame that ends a stream (the answer had started: HTTP 200). */
  function explainStreamError(code) {
    // 3040 in a stream is the server's drain cutting the answer, never capacity (that is refused before it starts)
    if (code === 3040) {
      return "The server is shutting down and ended this answer before it finished. Try again in a moment.";
    }
    return explainError(200, code, null);
  }

  function parseFrame(data) {
    try {
      const frame = JSON.parse(data);
      if (frame && typeof frame === "object") return frame;
    } catch {
      // reported below
    }
    throw new PlaygroundError("The server sent a stream frame that is not a JSON object.", data.slice(0, 200));
  }

  // --- connection, models and their limits ---------------------------------------------------------------------

  async function connect(event) {
    if (event) event.preventDefault();
    if (state.connecting) return;
    const token = ui.token.value.trim();
    disconnect();
    if (!token) {
      showStatus(ui.connectStatus, new PlaygroundError("Enter an API token."));
      return;
    }
    if (!TOKEN_PATTERN.test(token)) {
      showStatus(ui.connectStatus,
        new PlaygroundError("An API token is made of visible ASCII characters, without spaces."));
      return;
    }
    state.token = token;
    state.connecting = true;
    updateControls();
    showStatus(ui.connectStatus, "Connecting…");
    try {
      const accounts = await apiResult(`${API_BASE}/accounts`);
      const account = Array.isArray(accounts) ? accounts[0] : null;
      if (!account || typeof account.id !== "string") throw new PlaygroundError("This token gives access to no account.");
      state.account = account.id;
      rememberToken(token);
      const models = await apiResult(`${accountBase()}/models/search?per_page=100`);
      if (!Array.isArray(models) || models.length === 0) throw new PlaygroundError("This server serves no model.");
      fillModelPicker(models);
      await loadModelLimits();
      showStatus(ui.connectStatus, `Connected: account ${account.name || account.id}.`);
    } catch (err) {
      disconnect();
      showStatus(ui.connectStatus, err);
    } finally {
      state.connecting = false;
      updateControls();
    }
  }

  function disconnect() {
    state.token = "";
    state.account = "";
    state.models.clear();
    ui.model.replaceChildren();
    ui.modelDescription.textContent = "";
    updateControls();
  }

  function rememberToken(token) {
    try {
      if (ui.rememberToken.checked) localStorage.setItem(TOKEN_STORAGE_KEY, token);
      else localStorage.removeItem(TOKEN_STORAGE_KEY);
    } catch {
      // storage disabled: the token simply stays in memory
    }
  }

  function fillModelPicker(models) {
    const options = [];
    for (const model of models) {
      if (!model || typeof model.name !== "string") continue;
      state.models.set(model.name, model);
      const option = document.createElement("option");
      option.value = model.name;
      option.textContent = model.name;
      options.push(option);
    }
    ui.model.replaceChildren(...options);
    describeModel();
  }

  function describeModel() {
    const model = state.models.get(ui.model.value);
    ui.modelDescription.textContent = model && typeof model.description === "string" ? model.description : "";
  }

  function cardProperty(model, id) {
    const found = model && Array.isArray(model.properties)
      ? model.properties.find((p) => p && p.property_id === id) : null;
    return found ? found.value : undefined;
  }

  /** The properties of the card's input schema that apply to a `messages` request. */
  function messagesFormProperties(schema) {
    if (!schema || typeof schema !== "object") return {};
    const branches = Array.isArray(schema.oneOf) ? schema.oneOf : [];
    const messagesForm = branches.find((b) => b && b.properties && "messages" in b.properties);
    return { ...(schema.properties || {}), ...((messagesForm && messagesForm.properties) || {}) };
  }

  /** Bounds the inputs with the picked model's limits; an answer that comes after another pick is dropped. */
  async function loadModelLimits() {
    const name = ui.model.value;
    const request = ++state.limitsRequest;
    let schema;
    try {
      schema = await apiResult(`${accountBase()}/models/schema?model=${encodeURIComponent(name)}`);
    } catch (err) {
      if (request === state.limitsRequest) throw err;
      return;
    }
    if (request !== state.limitsRequest) return; // the later pick's own request sets the limits
    const cardProperties = messagesFormProperties(schema && schema.input);
    const sequenceLimit = Number(cardProperty(state.models.get(name), "sequence_length_limit"));
    for (const parameter of PARAMETER_NAMES) {
      const limit = { ...(serverRanges[parameter] || {}) };
      for (const key of ["type", "minimum", "maximum", "default"]) {
        const fromCard = cardProperties[parameter] && cardProperties[parameter][key];
        if (fromCard !== undefined) limit[key] = fromCard;
      }
      if (parameter === "max_tokens" && limit.maximum === undefined && sequenceLimit > 0) limit.maximum = sequenceLimit;
      state.limits[parameter] = limit;
      showLimit(parameter, limit);
    }
  }

  function parameterInput(parameter) {
    return byId(`param-${parameter}`);
  }

  function showLimit(parameter, limit) {
    const input = parameterInput(parameter);
    for (const [attribute, value] of [["min", limit.minimum], ["max", limit.maximum]]) {
      if (typeof value === "number") input.setAttribute(attribute, String(value));
      else input.removeAttribute(attribute);
    }
    input.step = limit.type === "integer" ? "1" : "any";
    input.placeholder = limit.default !== undefined ? String(limit.default) : "default";
    let range = "";
    if (typeof limit.minimum === "number" && typeof limit.maximum === "number") range = `${limit.minimum} – ${limit.maximum}`;
    else if (typeof limit.minimum === "number") range = `≥ ${limit.minimum}`;
    else if (typeof limit.maximum === "number") range = `≤ ${limit.maximum}`;
    if (limit.default !== undefined) range += `${range ? ", " : ""}default ${limit.default}`;
    byId(`param-${parameter}-range`).textContent = range;
  }

  /** The sampling parameters the user set, checked against the limits (empty fields are left out). */
  function readParameters() {
    const parameters = {};
    for (const parameter of PARAMETER_NAMES) {
      const input = parameterInput(parameter);
      if (input.validity.badInput) throw new PlaygroundError(`${parameter} must be a number.`);
      const raw = input.value.trim();
      if (raw === "") continue;
      const value = Number(raw);
      const limit = state.limits[parameter] || {};
      if (!Number.isFinite(value)) throw new PlaygroundError(`${parameter} must be a number.`);
      if (limit.type === "integer" && !Number.isInteger(value)) {
        throw new PlaygroundError(`${parameter} must be a whole number.`);
      }
      const tooLow = typeof limit.minimum === "number" && value < limit.minimum;
      const tooHigh = typeof limit.maximum === "number" && value > limit.maximum;
      if (tooLow || tooHigh) {
        const bounds = [typeof limit.minimum === "number" ? `at least ${limit.minimum}` : "",
          typeof limit.maximum === "number" ? `at most ${limit.maximum}` : ""].filter(Boolean).join(" and ");
        throw new PlaygroundError(`${parameter} must be ${bounds}.`);
      }
      parameters[parameter] = value;
    }
    return parameters;
  }

  // --- the conversation --------------------------------------------------------------------------------------------

  function appendTurn(role, label, text) {
    const item = document.createElement("li");
    item.className = `turn ${role}`;
    const heading = document.createElement("p");
    heading.className = "role";
    heading.textContent = label;
    const content = document.createElement("div");
    content.className = "content";
    content.textContent = text;
    item.append(heading, content);
    ui.history.append(item);
    ui.emptyHistory.hidden = true;
    scrollToEnd();
    return { item, content };
  }

  function scrollToEnd() {
    ui.history.scrollTop = ui.history.scrollHeight;
  }

  function formatDuration(ms) {
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
  }

  /** Tokens, time to first token, tokens/s and neurons of one answer, from its usage frame and timings. */
  function answerFigures(usage, timing) {
    const tokens = Number(usage.completion_tokens) || 0;
    const ttft = timing.first === null ? null : timing.first - timing.sent;
    // decode speed after the first token when measurable, else the whole request's
    const decodeSeconds = timing.first === null ? 0 : (timing.last - timing.first) / 1000;
    const rate = tokens >= 2 && decodeSeconds >= 0.001
      ? (tokens - 1) / decodeSeconds
      : tokens / Math.max((timing.end - timing.sent) / 1000, 0.001);
    return { tokens, promptTokens: Number(usage.prompt_tokens) || 0, ttft, rate, neurons: usage.neurons };
  }

  function showFigures(turn, figures, cached) {
    const line = document.createElement("p");
    line.className = "figures";
    const parts = [
      ["tokens", figures.tokens, `${figures.tokens} tokens`, `${figures.promptTokens} prompt tokens`],
      ["ttft", figures.ttft, figures.ttft === null ? "TTFT –" : `TTFT ${formatDuration(figures.ttft)}`,
        "time to first token"],
      ["rate", figures.rate, `${figures.rate >= 100 ? Math.round(figures.rate) : figures.rate.toFixed(1)} tok/s`,
        "generated tokens per second after the first one"],
      ["neurons", figures.neurons, typeof figures.neurons === "number"
        ? `${figures.neurons.toFixed(2)} neurons` : "neurons –", "what the answer cost"],
    ];
    if (cached) parts.push(["cached", 1, "cached answer", "answered from the server's response cache"]);
    for (const [name, value, text, title] of parts) {
      const span = document.createElement("span");
      span.dataset.figure = name;
      if (typeof value === "number") span.dataset.value = String(value);
      span.title = title;
      span.textContent = text;
      line.append(span);
    }
    turn.item.append(line);
  }

  function showTurnError(turn, err) {
    const box = document.createElement("p");
    box.className = "turn-error";
    box.setAttribute("role", "alert");
    fillMessage(box, err);
    turn.item.append(box);
  }

  async function sendMessage(event) {
    if (event) event.preventDefault();
    if (state.controller || !state.account) return;
    const text = ui.message.value;
    if (!text.trim()) {
      showStatus(ui.composeStatus, new PlaygroundError("Type a message first."));
      return;
    }
    let parameters;
    try {
      parameters = readParameters();
    } catch (err) {
      showStatus(ui.composeStatus, err);
      return;
    }
    showStatus(ui.composeStatus, "");
    const model = ui.model.value;
    const system = ui.systemPrompt.value.trim();
    const question = { role: "user", content: text };
    const conversation = state.history; // New chat replaces it: this turn is kept only in the one it was asked in
    const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation, question];
    ui.message.value = "";
    appendTurn("user", "You", text);
    const turn = appendTurn("assistant", `Assistant · ${model}`, "");
    turn.item.dataset.state = "streaming";
    const controller = new AbortController();
    state.controller = controller;
    updateControls();

    const timing = { sent: performance.now(), first: null, last: null, end: null };
    let reply = "";
    let usage = null;
    let finished = false;
    try {
      const response = await apiFetch(runUrl(model), {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ messages, stream: true, ...parameters }),
        signal: controller.signal,
      });
      const cached = response.headers.get("cf-aig-cache-status") === "HIT";
      for await (const data of serverSentData(response.body)) {
        if (data === "[DONE]") {
          finished = true;
          break;
        }
        const frame = parseFrame(data);
        if (Array.isArray(frame.errors) && frame.errors.length) {
          const first = frame.errors[0] || {};
          throw new PlaygroundError(explainStreamError(first.code),
            `in the stream, code ${first.code}: ${first.message}`);
        }
        if (typeof frame.response === "string" && frame.response) {
          const now = performance.now();
          if (timing.first === null) timing.first = now;
          timing.last = now;
          reply += frame.response;
          turn.content.append(frame.response); // a text node: never parsed as HTML
          scrollToEnd();
        }
        if (frame.usage && typeof frame.usage === "object") usage = frame.usage;
      }
      timing.end = performance.now();
      if (!finished) throw new PlaygroundError("The answer was cut off: the stream ended before the server finished.");
      keepTurn(conversation, question, reply);
      turn.item.dataset.state = "done";
      showFigures(turn, answerFigures(usage || {}, timing), cached);
    } catch (err) {
      if (err && err.name === "AbortError") {
        turn.item.dataset.state = "stopped";
        if (reply) keepTurn(conversation, question, reply);
        showTurnError(turn, new PlaygroundError("Stopped."));
      } else {
        turn.item.dataset.state = "error";
        showTurnError(turn, err);
        if (!reply && !ui.message.value) ui.message.value = text; // ready to send again
      }
    } finally {
      state.controller = null;
      updateControls();
      scrollToEnd();
    }
  }

  /** Adds a question and its answer to `conversation`, unless New chat has replaced it since it was asked. */
  function keepTurn(conversation, question, reply) {
    if (conversation === state.history) conversation.push(question, { role: "assistant", content: reply });
  }

  function newChat() {
    if (state.controller) state.controller.abort();
    state.history = [];
    ui.history.replaceChildren();
    ui.emptyHistory.hidden = false;
    showStatus(ui.composeStatus, "");
  }

  // --- small helpers -------------------------------------------------------------------------------------------

  /** Puts a message (a string, or an error with its API detail) into `element`, as text. */
  function fillMessage(element, message) {
    if (typeof message === "string") {
      element.textContent = message;
      return;
    }
    const isKnown = message instanceof PlaygroundError;
    element.textContent = isKnown ? message.message : `Unexpected error: ${String(message)}`;
    if (isKnown && message.detail) {
      const detail = document.createElement("small");
      detail.className = "detail";
      detail.textContent = `(${message.detail})`;
      element.append(" ", detail);
    }
  }

  function showStatus(element, message) {
    fillMessage(element, message);
    element.classList.toggle("error", typeof message !== "string");
    if (typeof message === "string") element.removeAttribute("role");
    else element.setAttribute("role", "alert");
  }

  function updateControls() {
    const connected = Boolean(state.account) && !state.connecting;
    const busy = Boolean(state.controller);
    ui.connect.disabled = state.connecting;
    ui.model.disabled = !connected || busy;
    ui.send.disabled = !connected || busy;
    ui.stop.disabled = !busy;
  }

  ui.connectForm.addEventListener("submit", connect);
  ui.compose.addEventListener("submit", sendMessage);
  ui.stop.addEventListener("click", () => state.controller && state.controller.abort());
  ui.newChat.addEventListener("click", newChat);
  ui.model.addEventListener("change", () => {
    describeModel();
    loadModelLimits().catch((err) => showStatus(ui.connectStatus, err));
  });
  ui.rememberToken.addEventListener("change", () => {
    if (!ui.rememberToken.checked) rememberToken("");
    else if (state.account) rememberToken(state.token);
  });
  ui.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      ui.compose.requestSubmit();
    }
  });

  let savedToken = null;
  try {
    savedToken = localStorage.getItem(TOKEN_STORAGE_KEY);
  } catch {
    savedToken = null;
  }
  updateControls();
  if (savedToken) {
    ui.token.value = savedToken;
    ui.rememberToken.checked = true;
    connect();
  }
  document.documentElement.dataset.ready = "true";
})();
