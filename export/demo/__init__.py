"""The demo model: a small InternVL2.5 trained here on synthetic visual questions."""
