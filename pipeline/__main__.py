import sys

from pipeline import preempt


def _main() -> int:
    if sys.argv[1:2] != ["run"]:
        from pipeline.runner import main

        return main()
    preempt.install()  # before the heavy imports below: a signal during them is a stop request too
    try:
        from pipeline.runner import main

        return main()
    finally:
        preempt.finish()  # the run is over: a late signal while Python shuts down changes nothing


sys.exit(_main())
