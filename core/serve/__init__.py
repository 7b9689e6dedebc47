"""``crosspatch serve``: a local web page over one loaded model.

A person types a clean and a corrupt prompt, picks sites and a method and watches the sweep fill in
layer by layer; clicks a site to patch it and sees the next-token distribution change; drags a
steering strength (a contrast vector, or an SAE / transcoder feature's decoder row) and sees the
distribution follow. On a VAE the page shows a shapes image's reconstruction under steering and
patching, on a CLIP-style model its similarity to captions. Interventions arrive as their JSON
(:meth:`~crosspatch.engine.interventions.Intervention.to_dict`), never as code.

Modules: ``jobs`` (one worker thread runs model work in order; a job streams events, can be
cancelled, and a second job waits its turn), ``session`` (a text model and what can be asked of
it), ``features`` (SAEs and transcoders for the feature picker), ``image_session`` (VAE and CLIP
models), ``images`` (PNG data URLs, the shapes gallery), ``app`` (the Starlette routes and the
page), ``server`` (uvicorn, bound to loopback unless told otherwise). Needs the ``serve`` extra (starlette, uvicorn), imported only when a server starts.
Sits above the study files (it can save what the person did as one) and below the command line.
"""

__all__: list[str] = []
