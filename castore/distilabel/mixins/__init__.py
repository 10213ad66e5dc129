"""`distilabel.mixins` on castore."""
