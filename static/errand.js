// errand's dashboard: the little behaviour htmx does not cover. The Content
// Security Policy allows no inline script, so it all lives in this file.
(() => {
  "use strict";

  // Refreshing regions stop polling while the tab is hidden, and refresh
  // at once when it shows again.
  document.addEventListener("htmx:config:request", (event) => {
    const source = event.detail && event.detail.ctx && event.detail.ctx.sourceElement;
    if (document.hidden && source && source.hasAttribute("data-poll")) {
      event.preventDefault();
    }
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && window.htmx) {
      document.querySelectorAll("[data-poll]").forEach((el) => htmx.trigger(el, "errand-poll"));
    }
  });

  // Select all on the page, and the count of selected jobs.
  const countSelected = (form) => {
    const n = form.querySelectorAll('input[name="ids"]:checked').length;
    form.querySelectorAll("[data-selected-count]").forEach((el) => { el.textContent = String(n); });
  };
  document.addEventListener("change", (event) => {
    const target = event.target;
    if (!(target instanceof HTMLInputElement)) return;
    const form = target.closest("form");
    if (!form) return;
    if (target.matches("[data-check-all]")) {
      form.querySelectorAll('input[name="ids"]').forEach((box) => { box.checked = target.checked; });
    }
    if (target.matches("[data-check-all], input[name='ids']")) countSelected(form);
  });

  // Toasts leave by themselves; a click dismisses one sooner.
  const toasts = document.getElementById("toasts");
  if (toasts) {
    new MutationObserver((records) => {
      for (const record of records) {
        for (const node of record.addedNodes) {
          if (node instanceof HTMLElement) {
            const toast = node.classList.contains("toast") ? node : node.querySelector(".toast");
            if (toast) setTimeout(() => toast.remove(), 6000);
          }
        }
      }
    }).observe(toasts, { childList: true, subtree: true });
    toasts.addEventListener("click", (event) => {
      const toast = event.target instanceof Element && event.target.closest(".toast");
      if (toast) toast.remove();
    });
  }
})();
