"""Runs: the run folder on disk, its lock and liveness, the worker queue, and uploads.

``store`` holds the run folder model (the ``Run`` class, its states, file and environment
names, ``RunCancelled``, the JSON file helpers, listing and the teacher check); ``liveness``
whether a run's worker process still lives (``is_alive``, ``refresh_state``); ``progress`` the
training callback ``RunProgress`` and how progress reads (``eta_seconds``,
``progress_fraction``, ``run_label``); ``queue`` launching and queueing workers
(``launch_worker``, ``queue_worker``, ``start_queued``); ``uploads`` the uploaded files kept
per content. Import each name from the module that defines it.
"""
