"""Reports: read the stored JSON, write Markdown; no torch (:mod:`.acceptance`, :mod:`.results` - RESULTS.md -,
:mod:`.readme_blocks` - the README's generated tables -, :mod:`.labels` - names shared with the figures)."""
