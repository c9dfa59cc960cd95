"""The reproduction harness: attacks, data loading, the evaluated networks and the CLI.

Nothing in the library (`mvm_cuda.ops`, `mvm_cuda.nn`, `mvm_cuda.detector`) imports
this package; dependencies point one way, from here to the library. Of the modules
here, `attacks`, `data` and `models` know nothing of the defense either: they are the
plain adversarial-example setting of Feinman et al. (2017) that the detector is
evaluated in. Import them explicitly, e.g. ``from mvm_cuda.eval import attacks``.
"""
