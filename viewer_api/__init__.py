"""Share links, the viewer's JSON API and the web viewer page."""
