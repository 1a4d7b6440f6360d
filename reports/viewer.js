// The results viewer (reports/viewer.py writes this inline with the data as JSON). Plain DOM, no
// libraries, no network. State lives in the URL hash, so a view can be bookmarked or linked.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("viewer-data").textContent);
  const FIELDS = DATA.fields;
  const PAGE = 10; // sample pairs shown before "show more"
  const PALETTE = {
    T: [[107, 174, 214], [247, 247, 247], [244, 109, 67]], // low T (cool, confident) -> high T (hot)
    P: [[158, 154, 200], [247, 247, 247], [102, 189, 99]], // narrow nucleus -> wide nucleus
  };
  const VARIABLE = { T: "temperature T", P: "top-p P" };
  const state = {
    task: null, a: null, b: null, colour: "T", wrong: false, disagree: false, finish: "",
    min: null, max: null, q: "", cell: "", doc: null, shown: PAGE,
  };
  const cache = {};
  const cards = new WeakMap();

  // ------------------------------------------------------------------ helpers
  function el(tag, attrs, ...kids) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value == null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const kid of kids.flat()) if (kid != null) node.append(kid);
    return node;
  }
  // Replace a node's children, skipping null/undefined (optional parts) and flattening arrays.
  function fill(node, ...kids) {
    node.replaceChildren(...kids.flat().filter((kid) => kid != null));
  }
  const pct = (x) => (x == null ? "–" : (100 * x).toFixed(1));
  const num = (x, d) => (x == null ? "–" : Number(x).toFixed(d));
  const taskInfo = (name) => DATA.tasks.find((t) => t.name === name);

  function colourFor(value, name) {
    const scale = DATA.scale[name];
    if (value == null || !scale) return null;
    const [lo, hi] = scale;
    const t = Math.min(1, Math.max(0, (value - lo) / (hi - lo || 1)));
    const stops = PALETTE[name];
    const [from, to, f] = t < 0.5 ? [stops[0], stops[1], t * 2] : [stops[1], stops[2], (t - 0.5) * 2];
    const c = from.map((v, i) => Math.round(v + (to[i] - v) * f));
    return `rgb(${c[0]}, ${c[1]}, ${c[2]})`;
  }

  // The task's samples as objects, per method key and problem index (built once per task).
  function taskView(name) {
    if (cache[name]) return cache[name];
    const data = DATA.data[name];
    if (!data) return null;
    const byMethod = {};
    data.methods.forEach((method, m) => {
      byMethod[method.key] = data.samples[m].map((list) => list.map((row) => {
        const s = {};
        FIELDS.forEach((field, i) => { s[field] = row[i]; });
        s.key = `${s.seed}/${s.index}`;
        return s;
      }));
    });
    const index = {};
    data.problems.forEach((p, i) => { index[p.id] = i; });
    cache[name] = { data, byMethod, index, pairs: {} }; // pairs: "A|B" -> per problem, memoised
    return cache[name];
  }

  function accuracy(samples) {
    const graded = samples.filter((s) => s.correct != null);
    if (!graded.length) return null;
    return graded.reduce((sum, s) => sum + s.correct, 0) / graded.length;
  }

  // ------------------------------------------------------------------ state <-> URL hash
  function readHash() {
    const params = new URLSearchParams(location.hash.slice(1));
    for (const key of Object.keys(state)) {
      if (!params.has(key)) continue;
      const value = params.get(key);
      if (typeof state[key] === "boolean") state[key] = value === "1";
      else if (key === "min" || key === "max") state[key] = value === "" ? null : Number(value);
      else if (key === "shown") state.shown = Math.max(PAGE, Number(value) || PAGE);
      else if (key === "b") state.b = value === "-" ? "" : value;
      else state[key] = value;
    }
  }

  function hashOf(values) {
    const params = new URLSearchParams();
    for (const [key, value] of Object.entries(values)) {
      if (key === "b" && value === "") params.set("b", "-"); // B chosen as none (unset = pick a default)
      if (value == null || value === "" || value === false || (key === "shown" && value === PAGE)) continue;
      params.set(key, value === true ? "1" : String(value));
    }
    return params.toString();
  }

  function fixState() {
    const embedded = DATA.tasks.filter((t) => DATA.data[t.name]);
    if (!taskInfo(state.task)) state.task = (embedded[0] || DATA.tasks[0]).name;
    const info = taskInfo(state.task);
    const keys = info.methods;
    const view = taskView(state.task);
    if (!keys.includes(state.a)) {
      const traced = view ? view.data.methods.find((m) => m.traced) : null;
      state.a = traced ? traced.key : keys[0];
    }
    if (state.b == null) { // not chosen yet: the default method if there is one, else another
      const other = keys.find((k) => k !== state.a && / · default$/.test(k)) || keys.find((k) => k !== state.a);
      state.b = other || "";
    } else if (state.b && (!keys.includes(state.b) || state.b === state.a)) state.b = "";
    if (!state.b) state.disagree = false;
    if (!DATA.scale[state.colour] && (DATA.scale.T || DATA.scale.P)) state.colour = DATA.scale.T ? "T" : "P";
  }

  function go(changes) {
    const next = { ...state, ...changes };
    const info = taskInfo(next.task);
    if (info && !DATA.data[next.task] && info.href) {
      location.href = `${info.href}#${hashOf(next)}`;
      return;
    }
    Object.assign(state, changes);
    render();
  }

  // ------------------------------------------------------------------ header: pickers and legend
  function renderControls() {
    const info = taskInfo(state.task);
    const methodOptions = (selected, withNone) => [
      withNone ? el("option", { value: "", text: "— none —", selected: selected === "" }) : null,
      ...info.methods.map((k) => el("option", { value: k, text: k, selected: k === selected })),
    ];
    const taskSelect = el("select", { id: "pick-task", onchange: (e) => go({ task: e.target.value, a: null, b: null, doc: null, cell: "", shown: PAGE }) },
      DATA.tasks.map((t) => el("option", { value: t.name, selected: t.name === state.task,
        text: `${t.name} (${t.problems} problems)${DATA.data[t.name] ? "" : " ↗"}` })));
    const aSelect = el("select", { id: "pick-a", onchange: (e) => go({ a: e.target.value, cell: "", shown: PAGE }) },
      methodOptions(state.a, false));
    const bSelect = el("select", { id: "pick-b", onchange: (e) => go({ b: e.target.value, cell: "", shown: PAGE }) },
      methodOptions(state.b, true));
    const colour = el("select", { id: "pick-colour", onchange: (e) => go({ colour: e.target.value }) },
      ["T", "P"].filter((n) => DATA.scale[n]).map((n) => el("option", { value: n, text: VARIABLE[n], selected: n === state.colour })));
    const controls = document.getElementById("controls");
    fill(controls,
      el("label", {}, "task", taskSelect),
      el("label", {}, "method A", aSelect),
      el("label", {}, "side by side with B", bSelect),
      DATA.scale.T || DATA.scale.P ? el("label", {}, "colour tokens by", colour) : null,
    );
    const legend = document.getElementById("legend");
    const scale = DATA.scale[state.colour];
    if (!scale) {
      fill(legend, DATA.data[state.task] ? el("span", { text: "no per-token T/P traces on this page" }) : "");
      return;
    }
    const stops = PALETTE[state.colour].map((c) => `rgb(${c.join(",")})`).join(", ");
    fill(legend,
      el("span", { text: `${VARIABLE[state.colour]}: ${scale[0].toFixed(2)}` }),
      el("span", { class: "bar", style: `background: linear-gradient(to right, ${stops})` }),
      el("span", { text: `${scale[1].toFixed(2)}` }),
      el("span", { text: state.colour === "T" ? "(blue: cooler / more certain, red: hotter)" : "(purple: narrow nucleus, green: wide)" }),
    );
  }

  function renderNotice() {
    const notice = document.getElementById("notice");
    const view = taskView(state.task);
    const messages = [];
    if (!view) {
      const info = taskInfo(state.task);
      messages.push(el("span", {}, `The runs are too large for one page (budget ${DATA.max_mb} MB), so every task has its own page: `,
        ...DATA.tasks.map((t, i) => [i ? ", " : "", el("a", { href: t.href, text: t.name })]),
        info ? "." : ""));
    } else if (view.data.omitted) {
      messages.push(`The texts of ${view.data.omitted} of ${view.data.n_samples} samples were left out to keep this page under ` +
        `${DATA.max_mb} MB (their verdicts and lengths are here). Re-run \`autodeco view\` with a larger --max-mb, or --tasks to view fewer.`);
    }
    fill(notice, ...messages);
  }

  // ------------------------------------------------------------------ tables
  function renderTables() {
    const body = document.getElementById("tables-body");
    const blocks = [];
    for (const info of DATA.tasks) {
      const rows = info.table.map((r) => {
        const e = r.pass1;
        const current = info.name === state.task && r.method === state.a;
        return el("tr", { class: current ? "current" : null },
          el("td", { class: "name", text: r.method }),
          el("td", { class: "click", title: "show this method's samples", "data-task": info.name, "data-method": r.method,
            onclick: () => go({ task: info.name, a: r.method, b: state.b === r.method ? "" : state.b, cell: "", doc: null, shown: PAGE }) },
            `${pct(e.mean)} `, el("span", { class: "ci", text: e.ci_low == null ? "" : `[${pct(e.ci_low)}, ${pct(e.ci_high)}]` })),
          el("td", { text: String(e.n) }),
          el("td", { text: r.file_pass1 == null ? "–" : `${pct(r.file_pass1)} ± ${pct(r.file_std)}` }),
          el("td", { text: `${r.seeds} · ${r.samples}` }),
          el("td", { text: num(r.mean_tokens, 0) }),
          el("td", { text: r.length_share == null ? "–" : `${pct(r.length_share)}%` }),
          el("td", { text: num(r.T, 3) }),
          el("td", { text: num(r.P, 3) }));
      });
      const link = info.href && !DATA.data[info.name] ? el("a", { href: info.href, text: " (open its page)" }) : null;
      blocks.push(el("h3", {}, `${info.name} — ${info.problems} problems`, link));
      blocks.push(el("table", { class: "pass1", "data-task": info.name },
        el("tr", {}, ["Method", "Pass@1 % [95% CI]", "problems", "results file Pass@1 ± std (seeds)", "seeds · samples",
          "mean tokens", "cut at max tokens", "mean T", "mean P"].map((h, i) => el("th", { class: i ? null : "name", text: h }))),
        rows));
      if (info.name === state.task && info.pairs.length) blocks.push(pairsTable(info));
    }
    fill(body, ...blocks);
  }

  function pairsTable(info) {
    const rows = info.pairs.map((p) => {
      const d = p.diff;
      const better = (winner, loser, count) => el("td", { class: count ? "click" : null, "data-winner": winner, "data-loser": loser,
        title: count ? `problems where ${winner} has a higher accuracy than ${loser}` : null,
        onclick: count ? () => go({ a: winner, b: loser, cell: "a_better", wrong: false, disagree: false, doc: null, shown: PAGE }) : null,
      }, String(count));
      return el("tr", {},
        el("td", { class: "name", text: p.a }), el("td", { class: "name", text: p.b }),
        el("td", { class: d.p_value != null && d.p_value < 0.05 ? "sig" : null }, `${d.mean >= 0 ? "+" : ""}${pct(d.mean)} `,
          el("span", { class: "ci", text: d.ci_low == null ? "" : `[${pct(d.ci_low)}, ${pct(d.ci_high)}]` })),
        el("td", { text: d.p_value == null ? "–" : d.p_value.toPrecision(2) }),
        el("td", { text: String(d.n) }),
        better(p.a, p.b, p.a_better), better(p.b, p.a, p.b_better));
    });
    return el("div", {},
      el("h3", { text: `${info.name}: paired differences (A − B over the problems both ran; bold: p < 0.05)` }),
      el("table", { class: "pairs" },
        el("tr", {}, ["A", "B", "Δ Pass@1 pts [95% CI]", "p (paired t)", "problems", "A better on", "B better on"]
          .map((h, i) => el("th", { class: i < 2 ? "name" : null, text: h }))),
        rows));
  }

  // ------------------------------------------------------------------ filters and the problem list
  function inRange(s) {
    if (state.min != null && !(s.n_tokens >= state.min)) return false;
    if (state.max != null && !(s.n_tokens <= state.max)) return false;
    return !state.finish || s.finish === state.finish;
  }

  function pairsOf(view, i) {
    const memo = (view.pairs[`${state.a}|${state.b}`] ||= []);
    return (memo[i] ||= pairUp(view, i));
  }

  function pairUp(view, i) {
    const listA = view.byMethod[state.a][i] || [];
    const listB = state.b ? view.byMethod[state.b][i] || [] : [];
    const keyed = new Map();
    for (const s of listA) keyed.set(s.key, { a: s, b: null });
    for (const s of listB) {
      if (keyed.has(s.key)) keyed.get(s.key).b = s;
      else keyed.set(s.key, { a: null, b: s });
    }
    const order = (p) => p.a || p.b;
    return [...keyed.values()].sort((x, y) => order(x).seed - order(y).seed || order(x).index - order(y).index);
  }

  function pairPasses(pair) {
    const present = [pair.a, pair.b].filter(Boolean);
    if (state.wrong && !present.some((s) => s.correct === 0)) return false;
    if (state.disagree && !(pair.a && pair.b && pair.a.correct != null && pair.b.correct != null && pair.a.correct !== pair.b.correct)) return false;
    return present.some(inRange);
  }

  function visibleProblems(view) {
    const q = state.q.trim().toLowerCase();
    const out = [];
    view.data.problems.forEach((problem, i) => {
      if (q && !problem.id.toLowerCase().includes(q) && !(problem.prompt || "").toLowerCase().includes(q)) return;
      if (state.cell === "a_better") {
        const accA = accuracy(view.byMethod[state.a][i] || []);
        const accB = state.b ? accuracy(view.byMethod[state.b][i] || []) : null;
        if (accA == null || accB == null || !(accA > accB)) return;
      }
      const pairs = pairsOf(view, i).filter(pairPasses);
      if (pairs.length) out.push({ problem, i, pairs });
    });
    return out;
  }

  function renderFilters() {
    const box = document.getElementById("filters");
    const numberInput = (key, label) => el("input", { type: "number", min: 0, placeholder: label, value: state[key] ?? "",
      id: `filter-${key}`, onchange: (e) => go({ [key]: e.target.value === "" ? null : Number(e.target.value), shown: PAGE }) });
    const chip = state.cell === "a_better"
      ? el("div", { class: "chip", id: "cell-chip" }, el("span", { text: `problems where A beat B` }),
        el("button", { title: "clear", onclick: () => go({ cell: "" }), text: "✕" }))
      : null;
    fill(box,
      chip,
      el("label", {}, el("input", { type: "checkbox", id: "filter-wrong", checked: state.wrong, onchange: (e) => go({ wrong: e.target.checked, shown: PAGE }) }),
        "only wrong samples"),
      el("label", { title: state.b ? "" : "pick a method B first" }, el("input", { type: "checkbox", id: "filter-disagree", checked: state.disagree, disabled: !state.b,
        onchange: (e) => go({ disagree: e.target.checked, shown: PAGE }) }), "only where A and B disagree (same seed, sample)"),
      el("label", {}, "tokens", numberInput("min", "min"), "–", numberInput("max", "max")),
      el("label", {}, "finish", el("select", { id: "filter-finish", onchange: (e) => go({ finish: e.target.value, shown: PAGE }) },
        [["", "any"], ["stop", "stop"], ["length", "length (cut)"]].map(([v, t]) => el("option", { value: v, text: t, selected: state.finish === v })))),
      el("input", { type: "search", id: "filter-q", placeholder: "search doc id or prompt", value: state.q,
        onchange: (e) => go({ q: e.target.value, shown: PAGE }) }),
    );
  }

  function accText(list) {
    const graded = list.filter((s) => s.correct != null);
    const right = graded.reduce((sum, s) => sum + s.correct, 0);
    const cls = !graded.length ? null : right === graded.length ? "all" : right === 0 ? "none" : "some";
    return el("span", { class: cls, text: graded.length ? `${right}/${graded.length}` : "–" });
  }

  function renderProblems(view, visible) {
    const list = document.getElementById("problems");
    const count = document.getElementById("problem-count");
    count.textContent = `${visible.length} of ${view.data.problems.length} problems`;
    fill(list, ...visible.map(({ problem, i }) => el("li", {
      class: `problem${problem.id === state.doc ? " selected" : ""}`, "data-doc": problem.id,
      title: (problem.prompt || "").slice(0, 300), onclick: () => go({ doc: problem.id, shown: PAGE }),
    }, el("span", { class: "doc", text: `#${problem.id}` }),
    el("span", { class: "acc" }, "A ", accText(view.byMethod[state.a][i] || []),
      state.b ? [" · B ", accText(view.byMethod[state.b][i] || [])] : null))));
  }

  // ------------------------------------------------------------------ one problem: its sample pairs
  function renderProblem(view, visible) {
    const box = document.getElementById("problem");
    const entry = visible.find((v) => v.problem.id === state.doc);
    if (!entry) {
      fill(box, el("div", { class: "empty", text: visible.length ? "Pick a problem." : "No problem matches the filters." }));
      return;
    }
    const { problem, pairs } = entry;
    const two = Boolean(state.b);
    const shown = pairs.slice(0, state.shown);
    fill(box,
      el("details", { class: "prompt", open: true },
        el("summary", {}, el("b", { text: `${state.task} #${problem.id}` }),
          problem.target != null ? ` — target: ${problem.target}` : ""),
        el("pre", { text: problem.prompt ?? "(the prompt is not in this samples file: it was written before prompts were recorded)" })),
      el("div", { class: `column-head${two ? " two" : ""}` },
        el("div", { text: `A: ${state.a}` }), two ? el("div", { text: `B: ${state.b}` }) : null),
      ...shown.map((pair) => el("div", { class: `pair${two ? " two" : ""}`, "data-key": (pair.a || pair.b).key },
        sampleCard(pair.a, state.a, problem), two ? sampleCard(pair.b, state.b, problem) : null)),
      pairs.length > shown.length
        ? el("button", { class: "more", onclick: () => go({ shown: state.shown + PAGE }), text: `show ${Math.min(PAGE, pairs.length - shown.length)} more (${pairs.length - shown.length} left)` })
        : null,
    );
  }

  function sampleCard(s, method, problem) {
    if (!s) return el("div", { class: "sample missing", text: `${method} has no sample with this seed and index` });
    const verdict = s.correct == null ? "" : s.correct ? "correct" : "wrong";
    const card = el("div", { class: `sample ${verdict}`, "data-method": method, "data-seed": s.seed, "data-index": s.index },
      el("div", { class: "head" },
        el("span", { class: `badge ${s.correct == null ? "" : s.correct ? "ok" : "bad"}`, text: s.correct == null ? "ungraded" : s.correct ? "✓ correct" : "✗ wrong" }),
        el("span", { text: `seed ${s.seed} · sample ${s.index}` }),
        el("span", { text: `answer: ${s.extracted ?? "none"}${problem.target != null ? ` (target ${problem.target})` : ""}` }),
        el("span", { text: `${s.n_tokens ?? "?"} tokens · ${s.finish ?? "?"}` })),
      ...sampleBody(s));
    cards.set(card, s);
    return card;
  }

  function sampleBody(s) {
    const trace = s.trace;
    const tokens = trace && Array.isArray(trace.tokens) ? trace.tokens : null;
    if (s.text == null) return [el("div", { class: "note", text: "text not embedded: this page reached its size budget (see the note at the top)" })];
    const out = [];
    if (tokens && typeof s.text === "number") out.push(tokenText(tokens, trace, s.text));
    else {
      out.push(el("pre", { class: "text", text: s.text }));
      if (trace && (trace.T || trace.P)) {
        out.push(el("div", { class: "note", text: tokens ? "the token texts do not match the response: shown without colours"
          : "no per-token text in this samples file (written before the viewer): T/P line only" }));
      }
    }
    if (trace && (trace.T || trace.P)) out.push(...sparkline(trace, s.n_tokens));
    return out;
  }

  function tokenText(tokens, trace, responseLength) {
    const pre = el("pre", { class: "text tokens" });
    const values = trace[state.colour] || trace.T || trace.P;
    const name = trace[state.colour] ? state.colour : trace.T ? "T" : "P";
    const frag = document.createDocumentFragment();
    let pos = 0;
    tokens.forEach((piece, i) => {
      const background = colourFor(values ? values[i] : null, name);
      const span = (text, cut) => {
        const node = el("span", { class: `tok${cut ? " cut" : ""}`, "data-i": i });
        node.textContent = text;
        if (background) node.style.backgroundColor = background;
        return node;
      };
      if (piece === "") {
        const node = span("∎", pos >= responseLength);
        node.classList.add("special");
        frag.append(node);
      } else if (pos + piece.length <= responseLength) frag.append(span(piece, false));
      else if (pos >= responseLength) frag.append(span(piece, true));
      else frag.append(span(piece.slice(0, responseLength - pos), false), span(piece.slice(responseLength - pos), true));
      pos += piece.length;
    });
    pre.append(frag);
    return pre;
  }

  function sparkline(trace, nTokens) {
    const svgNS = "http://www.w3.org/2000/svg";
    const length = Math.max((trace.T || []).length, (trace.P || []).length);
    const svg = document.createElementNS(svgNS, "svg");
    svg.setAttribute("class", "spark");
    svg.setAttribute("viewBox", `0 0 ${Math.max(length, 2)} 40`);
    svg.setAttribute("preserveAspectRatio", "none");
    const legend = el("div", { class: "spark-legend" });
    for (const name of ["T", "P"]) {
      const values = trace[name];
      if (!values || !values.length) continue;
      const lo = Math.min(...values, DATA.scale[name] ? DATA.scale[name][0] : Infinity);
      const hi = Math.max(...values, DATA.scale[name] ? DATA.scale[name][1] : -Infinity);
      const y = (v) => 37 - (34 * (v - lo)) / (hi - lo || 1);
      const line = document.createElementNS(svgNS, "polyline");
      line.setAttribute("class", name.toLowerCase());
      line.setAttribute("fill", "none");
      line.setAttribute("stroke-width", "1.5");
      line.setAttribute("vector-effect", "non-scaling-stroke");
      line.setAttribute("points", values.map((v, i) => `${i + 0.5},${y(v).toFixed(2)}`).join(" "));
      svg.append(line);
      const mean = values.reduce((a, b) => a + b, 0) / values.length;
      legend.append(el("span", { class: name.toLowerCase(), text: `${name}: ${Math.min(...values).toFixed(2)}–${Math.max(...values).toFixed(2)}, mean ${mean.toFixed(3)}` }));
    }
    const marker = document.createElementNS(svgNS, "line");
    marker.setAttribute("class", "marker");
    marker.setAttribute("y1", "0");
    marker.setAttribute("y2", "40");
    marker.setAttribute("stroke", "#000");
    marker.setAttribute("vector-effect", "non-scaling-stroke");
    marker.setAttribute("visibility", "hidden");
    svg.append(marker);
    const stride = trace.stride || Math.max(1, Math.ceil((nTokens || length) / length));
    if (stride > 1) legend.append(el("span", { text: `one point per ${stride} tokens (their mean)` }));
    return [svg, legend];
  }

  // ------------------------------------------------------------------ token hover: values + marker on the line
  const tooltip = document.getElementById("tooltip");
  document.addEventListener("mouseover", (event) => {
    const token = event.target.closest && event.target.closest(".tok");
    if (!token) return;
    const card = token.closest(".sample");
    const s = cards.get(card);
    if (!s || !s.trace) return;
    const i = Number(token.dataset.i);
    const stride = s.trace.stride || 1;
    const piece = s.trace.tokens[i];
    const where = stride > 1 ? `tokens ${i * stride}–${i * stride + stride - 1} (mean)` : `token ${i}`;
    const values = ["T", "P"].filter((n) => s.trace[n]).map((n) => `${n} ${Number(s.trace[n][i]).toFixed(3)}`).join(" · ");
    tooltip.textContent = `${where} · ${values}\n${piece === "" ? "(special token, no text)" : JSON.stringify(piece).slice(0, 80)}`;
    tooltip.hidden = false;
    const marker = card.querySelector("line.marker");
    if (marker) {
      marker.setAttribute("x1", i + 0.5);
      marker.setAttribute("x2", i + 0.5);
      marker.setAttribute("visibility", "visible");
    }
  });
  document.addEventListener("mousemove", (event) => {
    if (tooltip.hidden) return;
    tooltip.style.left = `${Math.min(event.clientX + 14, window.innerWidth - 350)}px`;
    tooltip.style.top = `${event.clientY + 16}px`;
  });
  document.addEventListener("mouseout", (event) => {
    const token = event.target.closest && event.target.closest(".tok");
    if (!token) return;
    tooltip.hidden = true;
    const marker = token.closest(".sample").querySelector("line.marker");
    if (marker) marker.setAttribute("visibility", "hidden");
  });

  // ------------------------------------------------------------------ render all
  function render() {
    fixState();
    renderControls();
    renderNotice();
    renderTables();
    const view = taskView(state.task);
    if (!view) {
      fill(document.getElementById("filters"));
      document.getElementById("problem-count").textContent = "";
      fill(document.getElementById("problems"));
      const info = taskInfo(state.task);
      fill(document.getElementById("problem"), el("div", { class: "empty" },
        `The samples of ${state.task} are on `, el("a", { href: `${info.href}#${hashOf(state)}`, id: "task-page-link", text: info.href }), "."));
    } else {
      renderFilters();
      const visible = visibleProblems(view);
      if (!visible.some((v) => v.problem.id === state.doc)) state.doc = visible.length ? visible[0].problem.id : null;
      renderProblems(view, visible);
      renderProblem(view, visible);
    }
    history.replaceState(null, "", `#${hashOf(state)}`);
    document.body.dataset.ready = "1";
  }

  const meta = document.getElementById("meta");
  meta.textContent = `runs: ${DATA.sources.join(", ")} · written ${DATA.created}`;
  meta.title = meta.textContent;
  readHash();
  render();
  window.addEventListener("hashchange", () => { readHash(); render(); });
})();
