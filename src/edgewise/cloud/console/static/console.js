// Edgewise console: live charts and state of a node page (Server-Sent Events + Plotly).
"use strict";
(function () {
  const charts = document.getElementById("charts");
  if (!charts) return;
  const status = document.getElementById("live-status");
  const badge = document.getElementById("state");
  const reason = document.getElementById("reason");
  let updates = 0;

  function draw(snap) {
    const traces = Object.entries(snap.charts).map(([stream, s]) => ({
      x: s.t.map((t) => new Date(t * 1000)), y: s.v, name: stream, mode: "lines",
      type: "scatter",
    }));
    if (typeof Plotly === "undefined") {
      charts.textContent = "Charts need Plotly's bundle (pip install plotly on the control plane).";
      return;
    }
    Plotly.react(charts, traces, {
      margin: { l: 50, r: 10, t: 10, b: 40 }, height: 280,
      yaxis: { title: { text: "records/s" }, rangemode: "tozero" },
      xaxis: { type: "date" }, legend: { orientation: "h" },
    }, { displayModeBar: false, responsive: true });
  }

  function update(snap) {
    updates += 1;
    charts.dataset.updates = String(updates);
    charts.dataset.points = String(
      Object.values(snap.charts).reduce((n, s) => n + s.v.length, 0));
    badge.textContent = snap.state;
    badge.className = "badge state-" + snap.state;
    reason.textContent = snap.reason;
    status.textContent = "updated " + new Date(snap.at * 1000).toISOString().slice(11, 19) +
      " UTC" + (snap.session ? " · session open" : " · no session");
    draw(snap);
  }

  const source = new EventSource(charts.dataset.live);
  source.addEventListener("update", (e) => update(JSON.parse(e.data)));
  source.onerror = () => { status.textContent = "reconnecting…"; };
})();
