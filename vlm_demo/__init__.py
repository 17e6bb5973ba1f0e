"""The one-command demo (``vlm-demo``): tiny checkpoint -> both services -> streamed answers -> shutdown.

Also home of ``vlm_demo.services``, the child-process launcher the end-to-end tests share.
"""
