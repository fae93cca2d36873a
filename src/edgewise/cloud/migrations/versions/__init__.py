"""Migration scripts, applied in order by `edgewise.cloud.store.Store.open`."""
