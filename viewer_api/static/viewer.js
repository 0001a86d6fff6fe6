/* IMAG share viewer: learns the study from /api/view/study, draws frames the
 * server rendered at the displayed size, prefetches the visible series.
 * No third-party code, no request to another origin. */
"use strict";

(function () {
  const TEXT = {
    en: {
      loading: "Loading…", download: "Download (ZIP)", tool_wl: "W/L", tool_pan: "Pan",
      tool_zoom: "Zoom", reset: "Reset", preset_default: "Default", preset_soft: "Soft tissue",
      preset_lung: "Lung", preset_bone: "Bone", preset_brain: "Brain", play: "Play",
      pause: "Pause", report: "Report", open_pdf: "Open the report (PDF)", born: "born",
      images: "images", frames: "frames", no_access:
        "This link cannot be used: it has expired, was revoked, or your session ended. " +
        "Ask the person who sent it to you for a new link.",
      not_found: "This study is not available.", error: "Something went wrong. Try again later.",
      image: "Image", window: "W", level: "L",
    },
    fr: {
      loading: "Chargement…", download: "Télécharger (ZIP)", tool_wl: "Fenêtre",
      tool_pan: "Déplacer", tool_zoom: "Zoom", reset: "Réinitialiser",
      preset_default: "Par défaut", preset_soft: "Tissus mous", preset_lung: "Poumon",
      preset_bone: "Os", preset_brain: "Cerveau", play: "Lecture", pause: "Pause",
      report: "Compte rendu", open_pdf: "Ouvrir le compte rendu (PDF)", born: "né(e) le",
      images: "images", frames: "images", no_access:
        "Ce lien ne peut pas être utilisé : il a expiré, a été révoqué, ou votre session " +
        "est terminée. Demandez un nouveau lien à la personne qui vous l'a envoyé.",
      not_found: "Cet examen n'est pas disponible.",
      error: "Une erreur est survenue. Réessayez plus tard.", image: "Image", window: "L",
      level: "C",
    },
  };
  const MAX_BITMAPS = 400;
  const PREFETCH_PARALLEL = 4;
  const $ = (id) => document.getElementById(id);

  let lang = localStorage.getItem("imag.lang") ||
    ((navigator.language || "en").toLowerCase().startsWith("fr") ? "fr" : "en");
  const state = {
    study: null, series: null, stack: [], index: 0, window: null, tool: "wl",
    zoom: 1, panX: 0, panY: 0, playing: null, bitmaps: new Map(), pending: new Map(),
    drawn: null, generation: 0, windowing: false, windowAgain: false,
  };

  function t(key) { return (TEXT[lang] || TEXT.en)[key] || TEXT.en[key] || key; }

  function translate() {
    document.documentElement.lang = lang;
    document.querySelectorAll("[data-i18n]").forEach((el) => {
      if (el.id === "patient-name" && state.study) return;
      if (el.id === "play" && state.playing) { el.textContent = t("pause"); return; }
      el.textContent = t(el.dataset.i18n);
    });
    $("lang").textContent = lang === "fr" ? "EN" : "FR";
    if (state.study) { header(); overlays(); }
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

  async function getJSON(url) {
    const answer = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!answer.ok) { const e = new Error(String(answer.status)); e.status = answer.status; throw e; }
    return answer.json();
  }

  function header() {
    const s = state.study;
    $("patient-name").textContent = s.patient.name || "—";
    const parts = [];
    if (s.patient.birth_date) parts.push(t("born") + " " + formatDate(s.patient.birth_date));
    parts.push(formatDate(s.study.date));
    if (s.study.description) parts.push(s.study.description);
    $("study-line").textContent = parts.filter(Boolean).join(" · ");
    document.title = "IMAG – " + (s.study.description || s.patient.name || "");
  }

  /* ---------------------------------------------------------------- images */

  function viewportSize() {
    const view = $("view");
    const ratio = Math.min(window.devicePixelRatio || 1, 2);
    // buckets of 64 pixels: resizing a little reuses what is cached
    const round = (n) => Math.max(64, Math.ceil((n * ratio * state.zoom) / 64) * 64);
    return [Math.min(round(view.clientWidth), 4096), Math.min(round(view.clientHeight), 4096)];
  }

  function imageURL(entry, size) {
    let url = state.study.image_url.replace("{instance}", entry.instance).replace("{frame}", entry.frame) +
      "?viewport=" + size[0] + "," + size[1];
    const win = state.window;
    if (win && !state.series.color) url += "&window=" + Math.round(win.center) + "," + Math.max(1, Math.round(win.width));
    return url;
  }

  function remember(url, bitmap) {
    state.bitmaps.set(url, bitmap);
    while (state.bitmaps.size > MAX_BITMAPS) {
      const [oldest, old] = state.bitmaps.entries().next().value;
      state.bitmaps.delete(oldest);
      if (old && old.close) old.close();
    }
  }

  function load(url) {
    if (state.bitmaps.has(url)) return Promise.resolve(state.bitmaps.get(url));
    if (state.pending.has(url)) return state.pending.get(url);
    const promise = fetch(url, { credentials: "same-origin" })
      .then((answer) => {
        if (!answer.ok) { const e = new Error(String(answer.status)); e.status = answer.status; throw e; }
        return answer.blob();
      })
      .then((blob) => createImageBitmap(blob))
      .then((bitmap) => { remember(url, bitmap); return bitmap; })
      .finally(() => state.pending.delete(url));
    state.pending.set(url, promise);
    return promise;
  }

  function draw(bitmap) {
    const canvas = $("canvas");
    const view = $("view");
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(view.clientWidth * ratio), h = Math.round(view.clientHeight * ratio);
    if (canvas.width !== w || canvas.height !== h) { canvas.width = w; canvas.height = h; }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(1, 0, 0, 1, 0, 0);
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, w, h);
    if (!bitmap) return;
    state.drawn = bitmap;
    const scale = Math.min(w / bitmap.width, h / bitmap.height) * state.zoom;
    const dw = bitmap.width * scale, dh = bitmap.height * scale;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, (w - dw) / 2 + state.panX * ratio, (h - dh) / 2 + state.panY * ratio, dw, dh);
    canvas.dataset.drawn = String(state.index + 1);
    canvas.dataset.size = w + "x" + h;
  }

  async function show() {
    if (!state.stack.length) return;
    const generation = ++state.generation;
    const url = imageURL(state.stack[state.index], viewportSize());
    overlays();
    if (state.bitmaps.has(url)) { draw(state.bitmaps.get(url)); return; }
    try {
      const bitmap = await load(url);
      if (generation === state.generation) draw(bitmap);
    } catch (e) {
      if (e.status === 401) message(t("no_access"));
    }
  }

  function overlays() {
    if (!state.series) return;
    const s = state.series;
    $("overlay-left").textContent = [s.modality, s.description].filter(Boolean).join(" ") +
      "\n" + t("image") + " " + (state.index + 1) + " / " + state.stack.length;
    const win = state.window || currentDefaultWindow();
    $("overlay-right").textContent = win && !s.color
      ? t("window") + " " + Math.round(win.width) + "  " + t("level") + " " + Math.round(win.center)
      : "";
  }

  function currentDefaultWindow() {
    const entry = state.stack[state.index];
    return entry ? entry.window : null;
  }

  async function prefetch(stack) {
    const size = viewportSize();
    const order = stack.map((_, i) => i)
      .sort((a, b) => Math.abs(a - state.index) - Math.abs(b - state.index));
    let next = 0;
    const worker = async () => {
      while (next < order.length && stack === state.stack) {
        const entry = stack[order[next++]];
        try { await load(imageURL(entry, size)); } catch (e) { if (e.status === 401) return; }
      }
    };
    await Promise.all(Array.from({ length: PREFETCH_PARALLEL }, worker));
  }

  /* ---------------------------------------------------------------- series */

  async function openSeries(series) {
    stop();
    state.series = series;
    document.querySelectorAll(".thumb").forEach((el) => el.classList.toggle("active", el.dataset.uid === series.uid));
    const body = await getJSON(series.url);
    const stack = [];
    let color = false;
    for (const inst of body.instances) {
      color = color || inst.color;
      for (let f = 1; f <= inst.frames; f++) {
        stack.push({ instance: inst.uid, frame: f, window: inst.window, frames: inst.frames, frameTime: inst.frame_time_ms });
      }
    }
    series.color = color;
    state.stack = stack;
    state.index = 0;
    state.window = null;
    state.zoom = 1; state.panX = 0; state.panY = 0;
    $("presets").hidden = series.modality !== "CT";
    $("play").hidden = stack.length < 2;
    $("play").textContent = t("play");
    selectTool(color ? "pan" : "wl");
    await show();
    prefetch(stack);
  }

  function thumbnails() {
    const list = $("series");
    list.textContent = "";
    for (const series of state.study.series) {
      const button = document.createElement("button");
      button.type = "button";
      button.className = "thumb";
      button.dataset.uid = series.uid;
      const canvas = document.createElement("canvas");
      canvas.width = 128; canvas.height = 128;
      const label = document.createElement("span");
      const count = series.instances > 1 ? series.instances + " " + t("images")
        : series.frames > 1 ? series.frames + " " + t("frames") : "";
      label.textContent = [series.modality, series.description, count].filter(Boolean).join(" · ");
      button.append(canvas, label);
      button.addEventListener("click", () => openSeries(series));
      list.append(button);
      load(series.thumbnail).then((bitmap) => {
        const ctx = canvas.getContext("2d");
        const scale = Math.min(128 / bitmap.width, 128 / bitmap.height);
        const w = bitmap.width * scale, h = bitmap.height * scale;
        ctx.drawImage(bitmap, (128 - w) / 2, (128 - h) / 2, w, h);
      }).catch(() => {});
    }
  }

  async function report() {
    const reports = state.study.reports;
    if (!reports.length) return;
    const body = $("report-body");
    body.textContent = "";
    for (const r of reports) {
      if (r.kind === "pdf") {
        const p = document.createElement("p");
        const a = document.createElement("a");
        a.href = r.url; a.target = "_blank"; a.rel = "noopener noreferrer";
        a.textContent = t("open_pdf"); a.dataset.i18n = "open_pdf";
        p.append(a); body.append(p);
      } else {
        try {
          const sr = await getJSON(r.url);
          for (const section of sr.sections) {
            if (section.heading) { const h = document.createElement("h3"); h.textContent = section.heading; body.append(h); }
            if (section.text) { const p = document.createElement("p"); p.textContent = section.text; body.append(p); }
          }
        } catch (e) { /* the PDF link remains */ }
      }
    }
    $("report").hidden = false;
  }

  /* ---------------------------------------------------------------- interaction */

  function go(delta) {
    if (!state.stack.length) return;
    const index = Math.max(0, Math.min(state.stack.length - 1, state.index + delta));
    if (index !== state.index) { state.index = index; show(); }
  }

  function selectTool(tool) {
    state.tool = tool;
    document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("active", b.dataset.tool === tool));
  }

  function setWindow(win) {
    state.window = win;
    overlays();
    // while dragging, one image in flight at a time: the latest window wins
    if (state.windowing) { state.windowAgain = true; return; }
    state.windowing = true;
    show().finally(() => {
      state.windowing = false;
      if (state.windowAgain) { state.windowAgain = false; setWindow(state.window); }
    });
  }

  function play() {
    if (state.playing) { stop(); return; }
    const entry = state.stack[state.index];
    const interval = Math.max(20, (entry && entry.frameTime) || 66);
    $("play").textContent = t("pause");
    state.playing = setInterval(() => {
      state.index = (state.index + 1) % state.stack.length;
      show();
    }, interval);
  }

  function stop() {
    if (state.playing) clearInterval(state.playing);
    state.playing = null;
    $("play").textContent = t("play");
  }

  function reset() {
    state.zoom = 1; state.panX = 0; state.panY = 0; state.window = null;
    show();
  }

  function zoomBy(factor) {
    state.zoom = Math.max(0.25, Math.min(16, state.zoom * factor));
    if (state.drawn) draw(state.drawn);
    clearTimeout(zoomBy.timer);
    zoomBy.timer = setTimeout(show, 150); // a sharper image for the new size
  }

  function bindInput() {
    const canvas = $("canvas");
    const pointers = new Map();
    let last = null, pinch = null, accumulated = 0;

    canvas.addEventListener("wheel", (event) => {
      event.preventDefault();
      if (event.ctrlKey || event.metaKey) { zoomBy(event.deltaY < 0 ? 1.1 : 1 / 1.1); return; }
      accumulated += event.deltaY;
      if (Math.abs(accumulated) >= 40 || event.deltaMode === 1) {
        go(accumulated > 0 ? 1 : -1);
        accumulated = 0;
      }
    }, { passive: false });

    canvas.addEventListener("pointerdown", (event) => {
      canvas.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      last = { x: event.clientX, y: event.clientY, button: event.button, shift: event.shiftKey, touch: event.pointerType === "touch" };
      if (pointers.size === 2) {
        const [a, b] = [...pointers.values()];
        pinch = { distance: Math.hypot(a.x - b.x, a.y - b.y), x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 };
      }
    });

    canvas.addEventListener("pointermove", (event) => {
      if (!pointers.has(event.pointerId) || !last) return;
      pointers.set(event.pointerId, { x: event.clientX, y: event.clientY });
      if (pointers.size === 2 && pinch) {
        const [a, b] = [...pointers.values()];
        const distance = Math.hypot(a.x - b.x, a.y - b.y);
        const cx = (a.x + b.x) / 2, cy = (a.y + b.y) / 2;
        state.panX += cx - pinch.x; state.panY += cy - pinch.y;
        if (pinch.distance > 0) zoomBy(distance / pinch.distance);
        pinch = { distance, x: cx, y: cy };
        return;
      }
      const dx = event.clientX - last.x, dy = event.clientY - last.y;
      const tool = last.button === 2 || last.shift ? "pan" : last.button === 1 ? "zoom" : state.tool;
      if (last.touch && tool === "pan" && state.zoom === 1 && Math.abs(dy) > Math.abs(dx)) {
        // a vertical swipe on an unzoomed image scrolls through the series
        if (Math.abs(dy) >= 24) { go(dy < 0 ? 1 : -1); last.x = event.clientX; last.y = event.clientY; }
        return;
      }
      last.x = event.clientX; last.y = event.clientY;
      if (tool === "pan") {
        state.panX += dx; state.panY += dy;
        if (state.drawn) draw(state.drawn);
      } else if (tool === "zoom") {
        zoomBy(Math.pow(1.01, -dy));
      } else if (tool === "wl" && !state.series.color) {
        const base = state.window || currentDefaultWindow() || { center: 128, width: 256 };
        const speed = Math.max(1, base.width / 256);
        setWindow({ center: base.center + dy * speed, width: Math.max(1, base.width + dx * speed) });
      }
    });

    const end = (event) => {
      pointers.delete(event.pointerId);
      if (pointers.size < 2) pinch = null;
      if (!pointers.size) last = null;
    };
    canvas.addEventListener("pointerup", end);
    canvas.addEventListener("pointercancel", end);
    canvas.addEventListener("contextmenu", (event) => event.preventDefault());

    document.addEventListener("keydown", (event) => {
      if (event.target && /^(INPUT|TEXTAREA|SELECT)$/.test(event.target.tagName)) return;
      const keys = {
        ArrowDown: () => go(1), ArrowRight: () => go(1), PageDown: () => go(10),
        ArrowUp: () => go(-1), ArrowLeft: () => go(-1), PageUp: () => go(-10),
        Home: () => go(-state.stack.length), End: () => go(state.stack.length),
        " ": () => play(), "+": () => zoomBy(1.25), "-": () => zoomBy(0.8), r: () => reset(),
      };
      const action = keys[event.key];
      if (action && state.stack.length) { event.preventDefault(); action(); }
    });

    document.querySelectorAll("[data-tool]").forEach((b) => b.addEventListener("click", () => selectTool(b.dataset.tool)));
    document.querySelectorAll("[data-preset]").forEach((b) => b.addEventListener("click", () => {
      const value = b.dataset.preset;
      if (value === "default") { setWindow(null); return; }
      const [center, width] = value.split(",").map(Number);
      setWindow({ center, width });
    }));
    $("reset").addEventListener("click", reset);
    $("play").addEventListener("click", play);
    $("lang").addEventListener("click", () => {
      lang = lang === "fr" ? "en" : "fr";
      localStorage.setItem("imag.lang", lang);
      translate();
    });
    // the image area changes size with the window, and also when the page
    // around it does (thumbnails, the report): redraw at the new size then
    let resizing = null;
    const resized = () => {
      if (state.drawn) draw(state.drawn);
      clearTimeout(resizing);
      resizing = setTimeout(show, 200);
    };
    window.addEventListener("resize", resized);
    if (window.ResizeObserver) new ResizeObserver(resized).observe($("view"));
  }

  /* ---------------------------------------------------------------- start */

  async function start() {
    translate();
    bindInput();
    try {
      state.study = await getJSON("/api/view/study");
    } catch (e) {
      $("patient-name").textContent = "IMAG";
      message(e.status === 401 || e.status === 403 ? t("no_access") : e.status === 404 ? t("not_found") : t("error"));
      return;
    }
    header();
    $("main").hidden = false;
    if (state.study.download.allowed) {
      $("download").href = state.study.download.url;
      $("download").setAttribute("download", "");
      $("download").hidden = false;
    }
    thumbnails();
    report();
    if (state.study.series.length) await openSeries(state.study.series[0]);
    document.body.dataset.ready = "true";
  }

  document.addEventListener("DOMContentLoaded", start);
})();
