"""Reports: read the stored JSON, write Markdown; no torch (:mod:`.acceptance`, :mod:`.results` - RESULTS.md -,
:mod:`.readme_blocks` - the generated tables of the README and docs pages -, :mod:`.labels` - names shared with the
figures -, :mod:`.schema` - what a stored parameters.json means where it leaves a field out, shared with the
validator)."""
