"""Synthetic inputs for the pipeline: an AI-READI-like retinal OCT dataset (``octjepa synth``) and a corpus of bad
inputs. Test and demo data, not a job: the Beam workers never import it.

Modules, each importing only those listed before it: ``volumes`` (the image model), ``devices`` (the scanners and
their protocols), ``dicom`` (the DICOM writers), ``layout`` (the release's folders and table columns),
``bad_inputs`` (one file per failure the pipeline must route) and ``dataset`` (the dataset writer and its command).
"""
