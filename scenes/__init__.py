"""What a scene is and where its parts come from. May use `renderers`; never imports `inverse_graphics`."""
