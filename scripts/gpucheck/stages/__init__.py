"""One module per stage of the GPU check, each with NAME, ORDER and run(check) (see gpucheck/runner.py).
Adding a stage is adding a module here."""
