"""Readers of the public FER data sets and of generic layouts, one module per family.

Each reader validates its files on open and returns a ``qcs_jax.data.sources``
source (it never prints): ``rafdb.rafdb``, ``ferplus.ferplus``,
``affectnet.affectnet``, ``generic.image_folder`` / ``generic.csv_manifest``;
``parsing`` holds the parsing helpers they share. ``qcs_jax.data.sources``
re-exports the reader functions and dispatches to them in ``open_split``.
"""
