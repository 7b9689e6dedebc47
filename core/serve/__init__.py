"""``crosspatch serve``: a local web page over one loaded model.

A person types a clean and a corrupt prompt, picks sites and a method and watches the sweep fill in
layer by layer; clicks a site to patch it and sees the next-token distribution change; drags a
steering strength and sees the distribution follow. Interventions arrive as their JSON
(:meth:`~crosspatch.engine.interventions.Intervention.to_dict`), never as code.

Modules: ``jobs`` (one worker thread runs model work in order; a job streams events, can be
cancelled, and a second job waits its turn), ``session`` (the model and what can be asked of it),
``app`` (the Starlette routes and the page), ``server`` (uvicorn, bound to loopback unless told
otherwise). Needs the ``serve`` extra (starlette, uvicorn), imported only when a server starts.
Sits above the study files (it can save what the person did as one) and below the command line.
"""

__all__: list[str] = []
