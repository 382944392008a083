"""Reports: true size (:mod:`.size`), latency across runtimes (:mod:`.latency`), rendering (:mod:`.render`).

Nothing heavy is imported here: ``from qexport.report.latency import run_report``.
"""
