module finemed/ollamarender

go 1.22
