// Client-side helpers for the LoRA Trainer tabs. The WebUI loads every file in javascript/ on each page.
// Kept free of globals other than this one namespace.
(function () {
    "use strict";
    window.loraTrainer = window.loraTrainer || {
        version: "0.1.0",
    };
})();
