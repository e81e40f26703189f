// Copy buttons: <button class="copy" data-copy="ID"> copies the text of element ID.
document.addEventListener("click", async (ev) => {
  const btn = ev.target.closest("button.copy");
  if (!btn) return;
  const el = document.getElementById(btn.dataset.copy);
  if (!el) return;
  const label = btn.textContent;
  try {
    await navigator.clipboard.writeText(el.textContent);
    btn.textContent = "Copied";
  } catch (e) {
    // No clipboard (plain http on another host): select the text for Ctrl+C instead.
    const range = document.createRange();
    range.selectNodeContents(el);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
    btn.textContent = "Press Ctrl+C";
  }
  setTimeout(() => { btn.textContent = label; }, 2000);
});
