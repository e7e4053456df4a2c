"""The plugins that ship with foxnode (pluginhost.DEFAULTS loads them
always; setup.cfg names them as entry points of the group
``foxnode.plugins`` too)."""
