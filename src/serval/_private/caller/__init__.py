"""The caller side, what a handle needs: a call's life (``calls``), routing to replicas
(``router``), the link to the controller and the pushed replica table (``client``), the
process-wide state of which cluster and which loops (``runtime``), and blocking control calls
(``control``).

May import: ``wire`` (and the public leaves ``serval.exceptions``, ``config``, ``status``).
"""
