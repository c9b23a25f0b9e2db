// int8serve /docs: the routes of openapi.json, listed as text.
//
// Why this file exists: FastAPI's default /docs (Swagger UI) loads its code from a CDN onto this origin, where the
// playground may keep a remembered API token in localStorage, and shows a blank page offline. This page needs no
// code from anywhere else (the page's Content-Security-Policy allows this origin only): it reads the document
// with a relative URL (so it works behind a path-prefix proxy) and inserts every string from it as text.
"use strict";

(() => {
  const METHODS = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];
  const status = document.getElementById("docs-status");
  const list = document.getElementById("operations");

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  /** One operation: `POST /path`, its summary, then each answer's status and description. */
  function operationItem(path, method, operation) {
    const item = element("li", "operation");
    const heading = element("h3");
    heading.append(element("code", "method", method.toUpperCase()), " ", element("code", "path", path));
    item.append(heading);
    if (operation.summary) item.append(element("p", "summary", operation.summary));
    const answers = element("ul", "answers");
    for (const [code, answer] of Object.entries(operation.responses || {})) {
      const types = Object.keys((answer && answer.content) || {}).join(", ");
      const text = `${code}: ${(answer && answer.description) || ""}${types ? ` (${types})` : ""}`;
      answers.append(element("li", "", text));
    }
    item.append(answers);
    return item;
  }

  /** The operations grouped by their first tag, in the document's order. */
  function render(document_) {
    const groups = new Map();
    for (const [path, item] of Object.entries(document_.paths || {})) {
      for (const method of METHODS) {
        const operation = item && item[method];
        if (!operation) continue;
        const tag = (operation.tags && operation.tags[0]) || "Other";
        if (!groups.has(tag)) groups.set(tag, []);
        groups.get(tag).push(operationItem(path, method, operation));
      }
    }
    for (const [tag, items] of groups) {
      const section = element("section");
      const operations = element("ul", "operations");
      operations.append(...items);
      section.append(element("h2", "", tag), operations);
      list.append(section);
    }
    const info = document_.info || {};
    status.textContent = `${info.title || "API"} ${info.version || ""}`.trim();
  }

  fetch(document.getElementById("document-link").href, { cache: "no-store", credentials: "omit" })
    .then((response) => {
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      return response.json();
    })
    .then(render)
    .catch((err) => {
      status.textContent = `openapi.json could not be read (${String((err && err.message) || err)}).`;
      status.classList.add("error");
    })
    .finally(() => {
      document.documentElement.dataset.ready = "true";
    });
})();
