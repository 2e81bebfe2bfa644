// The usage chart: credits per day (or hour), stacked by action, from the data the
// page carries (the tables below it show the same figures as text).
const canvas = document.getElementById('usage-chart');
const series = JSON.parse(document.getElementById('usage-series').textContent);
// Okabe-Ito: told apart by people with the common colour-vision deficiencies.
const COLOURS = ['#0072B2', '#E69F00', '#009E73', '#CC79A7', '#56B4E9', '#D55E00', '#F0E442', '#000000'];

if (typeof window.Chart === 'function' && canvas) {
  new window.Chart(canvas, {
    type: 'bar',
    data: {
      labels: series.labels,
      datasets: series.datasets.map((d, i) => ({...d, backgroundColor: COLOURS[i % COLOURS.length], borderWidth: 0})),
    },
    options: {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: {mode: 'index', intersect: false},
      scales: {
        x: {stacked: true, ticks: {maxRotation: 0, autoSkip: true}},
        y: {stacked: true, beginAtZero: true, title: {display: true, text: 'credits'}},
      },
      plugins: {legend: {position: 'bottom'}},
    },
  });
}
