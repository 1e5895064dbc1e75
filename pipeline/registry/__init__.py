"""The student as an MLflow model: a pyfunc that generates with WAND (``pyfunc``), logged and
registered per family, promoted to its alias only when the evals' gates pass (``register``)."""
