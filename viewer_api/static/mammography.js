/* IMAG mammography layout: learns the rounds from /api/view/mammography and
 * draws, per round, the four standard views RCC LCC RMLO LMLO; which image is
 * which view, and whether it is mirrored, the server decided from the images'
 * own attributes.  A signed-in reader's API token arrives in the address's
 * fragment (#token=...): it is taken out of the address before anything else
 * and kept in memory only.  No third-party code, no request to another origin. */
"use strict";

(function () {
  /* the token first: out of the address (and of the history entry) at once */
  let token = null;
  if (location.hash) {
    const fragment = new URLSearchParams(location.hash.slice(1));
    token = fragment.get("token") || null;
    history.replaceState(history.state, "", location.pathname + location.search);
  }

  const VIEWS = ["RCC", "LCC", "RMLO", "LMLO"];
  const TEXT = {
    en: {
      loading: "Loading…", current: "Current round", prior: "Prior round",
      no_prior: "No prior round", absent: "absent", born: "born",
      no_access: "This page cannot be used: your session or link has expired, or was revoked.",
      not_found: "This study is not available.", error: "Something went wrong. Try again later.",
    },
    fr: {
      loading: "Chargement…", current: "Examen actuel", prior: "Examen antérieur",
      no_prior: "Aucun examen antérieur", absent: "absente", born: "né(e) le",
      no_access: "Cette page ne peut pas être utilisée : votre session ou votre lien a expiré, " +
        "ou a été révoqué.",
      not_found: "Cet examen n'est pas disponible.",
      error: "Une erreur est survenue. Réessayez plus tard.",
    },
  };
  const $ = (id) => document.getElementById(id);
  let lang = localStorage.getItem("imag.lang") ||
    ((navigator.language || "en").toLowerCase().startsWith("fr") ? "fr" : "en");
  const state = { layout: null, prior: 0, cells: [] };

  function t(key) { return (TEXT[lang] || TEXT.en)[key] || TEXT.en[key] || key; }

  function request(url) {
    const init = { credentials: token ? "omit" : "same-origin", headers: {} };
    if (token) init.headers.Authorization = "Bearer " + token;
    return fetch(url, init).then((answer) => {
      if (!answer.ok) { const e = new Error(String(answer.status)); e.status = answer.status; throw e; }
      return answer;
    });
  }

  function formatDate(d) {
    if (!d || d.length !== 8) return d || "";
    const date = new Date(Date.UTC(+d.slice(0, 4), +d.slice(4, 6) - 1, +d.slice(6, 8)));
    return date.toLocaleDateString(lang === "fr" ? "fr-FR" : "en-GB", { timeZone: "UTC" });
  }

  function message(text) {
    $("message").textContent = text;
    $("message").hidden = !text;
  }

  function roundLine(round) {
    return [formatDate(round.date), round.site, round.description].filter(Boolean).join(" · ");
  }

  /* ---------------------------------------------------------------- cells */

  function caption(cell) {
    const absent = !cell.view;
    cell.caption.textContent = absent ? cell.name + " — " + t("absent") : cell.name;
  }

  function imageURL(cell, size) {
    let url = cell.view.url + "?viewport=" + size[0] + "," + size[1];
    if (cell.window) url += "&window=" + Math.round(cell.window.center) + "," + Math.max(1, Math.round(cell.window.width));
    return url;
  }

  function canvasSize(cell) {
    const ratio = window.devicePixelRatio || 1;
    const frame = cell.canvas.parentElement;
    return [Math.max(1, Math.round(frame.clientWidth * ratio)), Math.max(1, Math.round(frame.clientHeight * ratio))];
  }

  /* fitted, vertically centred, against the chest-wall side: a right breast
   * against the cell's right edge, a left one against its left edge */
  function paint(cell, bitmap) {
    const canvas = cell.canvas;
    const [w, h] = canvasSize(cell);
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    if (!bitmap) return;
    const scale = Math.min(w / bitmap.width, h / bitmap.height);
    const dw = Math.round(bitmap.width * scale), dh = Math.round(bitmap.height * scale);
    const x = cell.name.startsWith("R") ? w - dw : 0, y = Math.floor((h - dh) / 2);
    ctx.imageSmoothingQuality = "high";
    if (cell.view.flip) {
      ctx.translate(x + dw, y);
      ctx.scale(-1, 1);
      ctx.drawImage(bitmap, 0, 0, dw, dh);
    } else {
      ctx.drawImage(bitmap, x, y, dw, dh);
    }
  }

  async function draw(cell) {
    if (!cell.view) { cell.element.dataset.state = "absent"; paint(cell, null); return; }
    const generation = ++cell.generation;
    const [w, h] = canvasSize(cell);
    // buckets of 64 pixels: a small resize reuses the browser's cached image
    const bucket = (n) => Math.min(4096, Math.max(64, Math.ceil(n / 64) * 64));
    try {
      const answer = await request(imageURL(cell, [bucket(w), bucket(h)]));
      const bitmap = await createImageBitmap(await answer.blob());
      if (generation !== cell.generation) return;
      paint(cell, bitmap);
      cell.element.dataset.state = "drawn";
      cell.element.dataset.window = cell.window
        ? Math.round(cell.window.center) + "," + Math.max(1, Math.round(cell.window.width)) : "";
    } catch (e) {
      cell.element.dataset.state = "failed";
      if (e.status === 401 || e.status === 403) message(t("no_access"));
    }
  }

  function makeCells(container, round, key) {
    container.textContent = "";
    const cells = [];
    for (const name of VIEWS) {
      const view = round ? round.views[name] : null;
      const element = document.createElement("figure");
      element.className = "cell";
      element.dataset.view = name;
      element.dataset.round = key;
      element.dataset.state = view ? "loading" : "absent";
      if (view) { element.dataset.instance = view.instance; element.dataset.flip = String(view.flip); }
      const figcaption = document.createElement("figcaption");
      const frame = document.createElement("div");
      frame.className = "frame";
      const canvas = document.createElement("canvas");
      canvas.setAttribute("aria-label", name);
      frame.append(canvas);
      element.append(figcaption, frame);
      container.append(element);
      const cell = { name, view, element, canvas, caption: figcaption, window: null, generation: 0 };
      caption(cell);
      bindWindowing(cell);
      cells.push(cell);
    }
    return cells;
  }

  /* W/L: a drag on a cell changes its window (one image in flight at a time) */
  function bindWindowing(cell) {
    let last = null, busy = false, again = false;
    const redraw = () => {
      if (busy) { again = true; return; }
      busy = true;
      draw(cell).finally(() => { busy = false; if (again) { again = false; redraw(); } });
    };
    cell.canvas.addEventListener("pointerdown", (event) => {
      if (!cell.view) return;
      cell.canvas.setPointerCapture(event.pointerId);
      last = { x: event.clientX, y: event.clientY };
    });
    cell.canvas.addEventListener("pointermove", (event) => {
      if (!last || !cell.view) return;
      const dx = event.clientX - last.x, dy = event.clientY - last.y;
      last = { x: event.clientX, y: event.clientY };
      const base = cell.window || cell.view.window || { center: 2048, width: 4096 };
      const speed = Math.max(1, base.width / 256);
      cell.window = { center: base.center + dy * speed, width: Math.max(1, base.width + dx * speed) };
      redraw();
    });
    const end = () => { last = null; };
    cell.canvas.addEventListener("pointerup", end);
    cell.canvas.addEventListener("pointercancel", end);
    cell.canvas.addEventListener("dblclick", () => { if (cell.view) { cell.window = null; redraw(); } });
  }

  /* ---------------------------------------------------------------- rounds */

  function showPrior(index) {
    const priors = state.layout.priors;
    state.prior = index;
    const round = priors[index] || null;
    $("no-prior").hidden = !!round;
    $("prior-cells").hidden = !round;
    $("prior-title").textContent = round && priors.length === 1 ? roundLine(round) : "";
    state.cells = state.cells.filter((c) => c.element.dataset.round !== "prior");
    if (!round) return Promise.resolve();
    const cells = makeCells($("prior-cells"), round, "prior");
    state.cells.push(...cells);
    return Promise.all(cells.map(draw));
  }

  function header() {
    const layout = state.layout;
    $("patient-name").textContent = layout.patient.name || "—";
    const parts = [];
    if (layout.patient.birth_date) parts.push(t("born") + " " + formatDate(layout.patient.birth_date));
    parts.push(roundLine(layout.current));
    $("study-line").textContent = parts.filter(Boolean).join(" · ");
    $("current-title").textContent = roundLine(layout.current);
    const select = $("prior-select");
    select.textContent = "";
    layout.priors.forEach((round, i) => {
      const option = document.createElement("option");
      option.value = String(i);
      option.textContent = roundLine(round);
      select.append(option);
    });
    select.value = String(state.prior);
    select.hidden = layout.priors.length < 2;
  }

  function translate() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach((el) => {
      if (el.id === "patient-name" && state.layout) return;
      el.textContent = t(el.dataset.i18n);
    });
    $("lang").textContent = lang === "fr" ? "EN" : "FR";
    if (state.layout) { header(); state.cells.forEach(caption); }
  }

  async function start() {
    translate();
    $("lang").addEventListener("click", () => {
      lang = lang === "fr" ? "en" : "fr";
      localStorage.setItem("imag.lang", lang);
      translate();
    });
    const study = new URLSearchParams(location.search).get("study");
    const url = "/api/view/mammography" + (study ? "?study=" + encodeURIComponent(study) : "");
    try {
      state.layout = await (await request(url)).json();
    } catch (e) {
      $("patient-name").textContent = "IMAG";
      message(e.status === 401 || e.status === 403 ? t("no_access") : e.status === 404 ? t("not_found") : t("error"));
      return;
    }
    header();
    $("rounds").hidden = false;
    $("prior-select").addEventListener("change", (event) => {
      document.body.dataset.priorReady = "false";
      showPrior(Number(event.target.value)).then(() => { document.body.dataset.priorReady = "true"; });
    });
    state.cells = makeCells($("current-cells"), state.layout.current, "current");
    await Promise.all([Promise.all(state.cells.map(draw)), showPrior(0)]);
    document.body.dataset.priorReady = "true";
    document.body.dataset.ready = "true";
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(() => state.cells.forEach(draw), 200);
    });
  }

  document.addEventListener("DOMContentLoaded", start);
})();
