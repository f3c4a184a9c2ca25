/* Small helpers shared by the page's scripts (app.js, knowledge.js, resources.js, models.js).
 * Loaded first; plain functions on window.SwitchboardUI, no state, no network. They only build
 * DOM nodes with textContent and format numbers, so server data never reaches innerHTML here. */
(function () {
  "use strict";

  /** A new element with a class, text (set as textContent) and DOM properties such as {type, title, value}. */
  function el(tag, className, text, props) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return props ? Object.assign(node, props) : node;
  }

  /** A byte count for people. One convention on the whole page: decimal SI units (1 kB = 1000 B,
   * 1 MB = 10^6 B, 1 GB = 10^9 B), as `run.py models` / `run.py cache` and the catalog print sizes. */
  function bytes(n) {
    n = Number(n) || 0;
    const a = Math.abs(n);
    if (a >= 1e9) return (n / 1e9).toFixed(2) + " GB";
    if (a >= 1e6) return (n / 1e6).toFixed(1) + " MB";
    if (a >= 1e3) return Math.round(n / 1e3) + " kB";
    return n + " B";
  }

  /** How a measured memory change reads: `freed` is before − after, so it is negative when memory grew.
   * Under 1 MB either way is allocator noise on a switch, and is called unchanged. */
  function memoryChange(what, freed) {
    const n = Number(freed) || 0;
    if (Math.abs(n) < 1e6) return what + " unchanged";
    return n > 0 ? "freed " + what + " " + bytes(n) : what + " grew by " + bytes(-n);
  }

  /** Seconds as "42 s", "3 min 5 s" or "1 h 12 min"; "" for a missing value. */
  function duration(s) {
    if (typeof s !== "number" || !isFinite(s)) return "";
    s = Math.round(s);
    if (s < 60) return s + " s";
    const m = Math.floor(s / 60);
    return m < 60 ? m + " min " + (s % 60) + " s" : Math.floor(m / 60) + " h " + (m % 60) + " min";
  }

  /** A date (ISO string, epoch seconds or epoch milliseconds) in the browser's short local format. */
  function formatTime(value) {
    if (value === undefined || value === null || value === "") return "";
    const date = typeof value === "number" ? new Date(value < 1e12 ? value * 1000 : value) : new Date(value);
    return isNaN(date) ? "" : date.toLocaleString(undefined, { dateStyle: "short", timeStyle: "short" });
  }

  /** An error object ({code, message} from the server, or an Error from api()) as "code: message". */
  function errorText(e) {
    return ((e && e.code) || "error") + ": " + ((e && e.message) || "something went wrong");
  }

  window.SwitchboardUI = { el, bytes, memoryChange, duration, formatTime, errorText };
})();
