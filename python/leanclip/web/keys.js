// leanclip serve: keyboard navigation (the page works without it).
// "/" focuses the search box; the arrow keys move between photos; Enter opens one; Escape
// leaves the search box.
"use strict";
document.addEventListener("keydown", (ev) => {
  const box = document.querySelector("input[name=q]");
  const typing = ev.target instanceof HTMLInputElement || ev.target instanceof HTMLSelectElement;
  if (ev.key === "/" && !typing && box) { ev.preventDefault(); box.focus(); box.select(); return; }
  if (ev.key === "Escape" && typing) { ev.target.blur(); return; }
  if (typing || !ev.key.startsWith("Arrow")) return;
  const links = [...document.querySelectorAll("figure > a")];
  if (!links.length) return;
  const at = links.indexOf(document.activeElement);
  if (at < 0) { ev.preventDefault(); links[0].focus(); return; }
  const top = links[at].getBoundingClientRect().top;
  const perRow = links.filter((a) => a.getBoundingClientRect().top === top).length || 1;
  const step = { ArrowRight: 1, ArrowLeft: -1, ArrowDown: perRow, ArrowUp: -perRow }[ev.key];
  const next = links[Math.max(0, Math.min(links.length - 1, at + step))];
  ev.preventDefault();
  next.focus();
  next.scrollIntoView({ block: "nearest" });
});
