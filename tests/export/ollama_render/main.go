// Renders an Ollama Modelfile TEMPLATE the way Ollama's chat endpoint does, for tests/export/test_ollama.py.
//
// Reads one JSON object on stdin: {"template", "messages": [{"role", "content"}], "system" (the Modelfile's
// SYSTEM), "think" (null, true or false)}. Writes the prompt text on stdout. What it reproduces of Ollama
// (server/routes.go, template/template.go): the Modelfile SYSTEM becomes a first system message when the
// conversation has none; consecutive messages of one role (tool results aside) are merged with a blank
// line; .System is every system message joined by blank lines; the template is parsed with
// missingkey=zero and executed on .Messages, .System, .Tools, .Response, .Think, .ThinkLevel, .IsThinkSet.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"time"
)

type message struct {
	Role       string `json:"role"`
	Content    string `json:"content"`
	Thinking   string `json:"thinking"`
	ToolCalls  []any  `json:"tool_calls"`
	ToolName   string `json:"tool_name"`
	ToolCallID string `json:"tool_call_id"`
}

type request struct {
	Template string    `json:"template"`
	Messages []message `json:"messages"`
	System   string    `json:"system"`
	Think    *bool     `json:"think"`
	Tools    []any     `json:"tools"`
}

// Template functions of the same names as Ollama's, so a template using them parses.
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
	"currentDate":      func(...string) string { return time.Now().Format("2006-01-02") },
	"yesterdayDate":    func(...string) string { return time.Now().AddDate(0, 0, -1).Format("2006-01-02") },
	"toTypeScriptType": func(any) string { return "any" },
}

func main() {
	var req request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintln(os.Stderr, "bad input:", err)
		os.Exit(2)
	}
	msgs := req.Messages
	if req.System != "" && (len(msgs) == 0 || msgs[0].Role != "system") {
		msgs = append([]message{{Role: "system", Content: req.System}}, msgs...)
	}
	var systems []string
	var merged []*message
	for i := range msgs {
		m := msgs[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if n := len(merged); n > 0 && merged[n-1].Role == m.Role && m.Role != "tool" {
			merged[n-1].Content += "\n\n" + m.Content
			continue
		}
		merged = append(merged, &m)
	}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "parse:", err)
		os.Exit(3)
	}
	think, thinkSet := false, req.Think != nil
	if thinkSet {
		think = *req.Think
	}
	data := map[string]any{
		"System": strings.Join(systems, "\n\n"), "Messages": merged, "Tools": req.Tools, "Response": "",
		"Prompt": "", "Think": think, "ThinkLevel": "", "IsThinkSet": thinkSet,
	}
	if err := tmpl.Execute(os.Stdout, data); err != nil {
		fmt.Fprintln(os.Stderr, "execute:", err)
		os.Exit(4)
	}
}
