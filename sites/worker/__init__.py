"""The site's trainer worker: one long-lived process that keeps the DeepSpeed engine across rounds.

Why: Flower 1.41 starts a fresh ClientApp process for every message (docs/deployment.md,
"Engine reuse"), so in-process training pays the torch / DeepSpeed imports and an engine build
per message. ``fedpanfm site start`` therefore starts this worker next to the SuperNode and
passes its address in the node config (``trainer-socket``, ``trainer-key``,
``trainer-fallback``); the per-message ClientApp stays thin (no torch import) and forwards the
message content and the site's ``context.state`` here. The worker runs the very same
``train_site`` / ``evaluate_site`` as in-process training and sends back the reply content and
the updated state.

Transport: ``multiprocessing.connection`` over a Unix-domain socket in the site's state folder
(mode 0700), authenticated with a random key from a 0600 file beside it. Only bytes cross it,
never pickles (``send_bytes`` / ``recv_bytes``, not ``send``): frame 0 is a JSON header, every
further frame is one array's payload exactly as Flower's ``Array`` holds it (.npy bytes, read
back with ``allow_pickle=False`` or a header parse that rejects object dtypes, or raw bf16).

The worker serves one request at a time: a second ClientApp's connection waits in the
listen backlog until the engine is free.

A resumed run (run config ``resume``) is a new Flower run, so the SuperNode hands its first
message an empty ``context.state``. The worker outlives runs: it keeps the site's state after
each of the last :data:`KEPT_ROUNDS` rounds per run folder, and gives a resumed run's first
train call the state kept after the newest earlier round, which is what the site would have
held in the uninterrupted run (docs/reliability.md).

Modules: ``wire`` (the auth key and the frames both ends speak), ``client`` (what the thin
ClientApp calls: :func:`~sites.worker.client.call_worker`), ``server`` (the worker process:
:class:`~sites.worker.server.TrainerWorker`), ``supervisor`` (``fedpanfm site start``'s child
process, restarted when it dies) and ``__main__`` (``python -m sites.worker``).
"""
