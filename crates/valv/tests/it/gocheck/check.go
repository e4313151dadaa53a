// Command check verifies Valv's audit checkpoints and proofs with Go's sumdb packages
// (golang.org/x/mod/sumdb/note and golang.org/x/mod/sumdb/tlog), an implementation
// independent of Valv's own Rust code. Built and run by crates/valv/tests/it/independent.rs.
//
// Build offline against Debian's golang-golang-x-mod-dev:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o check check.go
//
// Usage: check [SPEC]   (SPEC is a file; standard input when absent or "-")
//
// SPEC is line-oriented; fields are separated by single spaces; hashes are base64 (32 bytes):
//
//	vkey <verifier key>                        required, first
//	checkpoint <file>                          required, second: the signed checkpoint note
//	leaves <leaf hash>...                      all leaf hashes; their tree must be the checkpoint's
//	inclusion <index> <leaf hash> <proof hash>...
//	consistency <m> <root of first m leaves> <proof hash>...     from size m to the checkpoint
//	consistency-note <file> <proof hash>...    from another signed checkpoint to the checkpoint
//	receipt <file> <leaf hash>                 a C2SP tlog-proof receipt for that leaf
//
// Prints one line per check, "ok <check>: ..." or "FAIL <check>: <reason>". Exits 0 when every
// check passed, 1 when a check failed, 2 when SPEC itself is malformed.
package main

import (
	"bufio"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	"golang.org/x/mod/sumdb/note"
	"golang.org/x/mod/sumdb/tlog"
)

type checkpoint struct {
	origin string
	size   int64
	root   tlog.Hash
}

var failed bool

func ok(format string, args ...interface{}) {
	fmt.Printf("ok "+format+"\n", args...)
}

func fail(format string, args ...interface{}) {
	failed = true
	fmt.Printf("FAIL "+format+"\n", args...)
}

func usage(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "check: "+format+"\n", args...)
	os.Exit(2)
}

// decodeHash decodes canonical (strict) standard base64 of exactly 32 bytes.
func decodeHash(s string) (tlog.Hash, error) {
	var h tlog.Hash
	b, err := base64.StdEncoding.Strict().DecodeString(s)
	if err != nil {
		return h, fmt.Errorf("not base64: %q", s)
	}
	if len(b) != len(h) {
		return h, fmt.Errorf("hash of %d bytes, want %d", len(b), len(h))
	}
	copy(h[:], b)
	return h, nil
}

func decodeHashes(fields []string) ([]tlog.Hash, error) {
	out := make([]tlog.Hash, 0, len(fields))
	for _, f := range fields {
		h, err := decodeHash(f)
		if err != nil {
			return nil, err
		}
		out = append(out, h)
	}
	return out, nil
}

// parseSize parses a decimal without sign or leading zeros.
func parseSize(s string) (int64, error) {
	if s == "" || (len(s) > 1 && s[0] == '0') || strings.TrimLeft(s, "0123456789") != "" {
		return 0, fmt.Errorf("not a decimal without leading zeros: %q", s)
	}
	return strconv.ParseInt(s, 10, 64)
}

// openCheckpoint verifies a signed note with the log's verifier and parses its text as a
// C2SP tlog-checkpoint: origin, size, base64 root, each line ending in a newline, signed by
// the key named like the origin.
func openCheckpoint(msg []byte, v note.Verifier) (checkpoint, error) {
	var cp checkpoint
	n, err := note.Open(msg, note.VerifierList(v))
	if err != nil {
		return cp, fmt.Errorf("signature: %v", err)
	}
	if !strings.HasSuffix(n.Text, "\n") {
		return cp, fmt.Errorf("text does not end in a newline")
	}
	lines := strings.Split(strings.TrimSuffix(n.Text, "\n"), "\n")
	if len(lines) != 3 {
		return cp, fmt.Errorf("text has %d lines, want 3 (origin, size, root)", len(lines))
	}
	cp.origin = lines[0]
	if cp.origin == "" {
		return cp, fmt.Errorf("empty origin")
	}
	if cp.size, err = parseSize(lines[1]); err != nil {
		return cp, fmt.Errorf("size: %v", err)
	}
	if cp.root, err = decodeHash(lines[2]); err != nil {
		return cp, fmt.Errorf("root: %v", err)
	}
	signedByOrigin := false
	for _, s := range n.Sigs {
		if s.Name == cp.origin {
			signedByOrigin = true
		}
	}
	if !signedByOrigin {
		return cp, fmt.Errorf("no verified signature by a key named like the origin %q", cp.origin)
	}
	if cp.size == 0 && cp.root != tlog.Hash(sha256.Sum256(nil)) {
		return cp, fmt.Errorf("empty tree with a root other than SHA-256 of the empty string")
	}
	return cp, nil
}

// parseReceipt parses a C2SP tlog-proof receipt: header, optional extra line, index, proof
// hashes, an empty line, then the signed checkpoint.
func parseReceipt(text []byte) (index int64, proof tlog.RecordProof, cpNote []byte, err error) {
	rest := string(text)
	next := func() (string, error) {
		i := strings.IndexByte(rest, '\n')
		if i < 0 {
			return "", fmt.Errorf("truncated receipt")
		}
		line := rest[:i]
		rest = rest[i+1:]
		return line, nil
	}
	line, err := next()
	if err != nil {
		return
	}
	if line != "c2sp.org/tlog-proof@v1" {
		err = fmt.Errorf("header %q, want c2sp.org/tlog-proof@v1", line)
		return
	}
	if line, err = next(); err != nil {
		return
	}
	if strings.HasPrefix(line, "extra ") {
		if line, err = next(); err != nil {
			return
		}
	}
	if !strings.HasPrefix(line, "index ") {
		err = fmt.Errorf("line %q, want index <n>", line)
		return
	}
	if index, err = parseSize(strings.TrimPrefix(line, "index ")); err != nil {
		return
	}
	for {
		if line, err = next(); err != nil {
			return
		}
		if line == "" {
			break
		}
		var h tlog.Hash
		if h, err = decodeHash(line); err != nil {
			return
		}
		proof = append(proof, h)
	}
	return index, proof, []byte(rest), nil
}

func main() {
	var in io.Reader = os.Stdin
	if len(os.Args) > 2 {
		usage("usage: check [SPEC]")
	}
	if len(os.Args) == 2 && os.Args[1] != "-" {
		f, err := os.Open(os.Args[1])
		if err != nil {
			usage("%v", err)
		}
		defer f.Close()
		in = f
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 1<<20), 1<<26)

	var (
		verifier note.Verifier
		cp       checkpoint
		haveCp   bool // the checkpoint line was read (verified or not)
		cpOK     bool // the checkpoint verified
		stored   []tlog.Hash
		nLeaves  int64 = -1 // leaves given and checked against the checkpoint's root
	)
	reader := tlog.HashReaderFunc(func(idx []int64) ([]tlog.Hash, error) {
		out := make([]tlog.Hash, len(idx))
		for i, x := range idx {
			if x < 0 || x >= int64(len(stored)) {
				return nil, fmt.Errorf("stored hash %d not available", x)
			}
			out[i] = stored[x]
		}
		return out, nil
	})

	for lineNo := 1; sc.Scan(); lineNo++ {
		fields := strings.Split(sc.Text(), " ")
		if len(fields) == 1 && fields[0] == "" {
			continue
		}
		kind, args := fields[0], fields[1:]
		if kind != "vkey" && verifier == nil {
			usage("line %d: the first line must be vkey", lineNo)
		}
		if kind != "vkey" && kind != "checkpoint" && !haveCp {
			usage("line %d: the second line must be checkpoint", lineNo)
		}
		switch kind {
		case "vkey":
			if len(args) != 1 || verifier != nil {
				usage("line %d: vkey <key>, once", lineNo)
			}
			v, err := note.NewVerifier(args[0])
			if err != nil {
				fail("vkey: %v", err)
				os.Exit(1)
			}
			verifier = v
			ok("vkey: %s+%08x", v.Name(), v.KeyHash())

		case "checkpoint":
			if len(args) != 1 || haveCp {
				usage("line %d: checkpoint <file>, once", lineNo)
			}
			msg, err := os.ReadFile(args[0])
			if err != nil {
				usage("line %d: %v", lineNo, err)
			}
			haveCp = true
			if cp, err = openCheckpoint(msg, verifier); err != nil {
				fail("checkpoint: %v", err)
				continue
			}
			if cp.origin != verifier.Name() {
				fail("checkpoint: origin %q is not the key name %q", cp.origin, verifier.Name())
				continue
			}
			cpOK = true
			ok("checkpoint: origin=%s size=%d root=%s", cp.origin, cp.size, cp.root)

		case "leaves":
			if !cpOK {
				fail("leaves: no verified checkpoint to check against")
				continue
			}
			leaves, err := decodeHashes(args)
			if err != nil {
				usage("line %d: %v", lineNo, err)
			}
			stored = stored[:0]
			bad := false
			for i, h := range leaves {
				hs, err := tlog.StoredHashesForRecordHash(int64(i), h, reader)
				if err != nil {
					fail("leaves: storing leaf %d: %v", i, err)
					bad = true
					break
				}
				stored = append(stored, hs...)
			}
			if bad {
				continue
			}
			if int64(len(leaves)) != cp.size {
				fail("leaves: %d leaf hashes for a checkpoint of size %d", len(leaves), cp.size)
				continue
			}
			root, err := tlog.TreeHash(int64(len(leaves)), reader)
			if err != nil {
				fail("leaves: %v", err)
				continue
			}
			if root != cp.root {
				fail("leaves: tree hash %s is not the checkpoint root %s", root, cp.root)
				continue
			}
			nLeaves = int64(len(leaves))
			ok("leaves: the %d leaf hashes have the checkpoint's root", len(leaves))

		case "inclusion":
			if len(args) < 2 {
				usage("line %d: inclusion <index> <leaf hash> <proof hash>...", lineNo)
			}
			index, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil {
				usage("line %d: index: %v", lineNo, err)
			}
			leaf, err := decodeHash(args[1])
			if err != nil {
				usage("line %d: leaf: %v", lineNo, err)
			}
			proof, err := decodeHashes(args[2:])
			if err != nil {
				usage("line %d: proof: %v", lineNo, err)
			}
			if !cpOK {
				fail("inclusion index=%d: no verified checkpoint to check against", index)
				continue
			}
			if err := tlog.CheckRecord(proof, cp.size, cp.root, index, leaf); err != nil {
				fail("inclusion index=%d size=%d: %v", index, cp.size, err)
				continue
			}
			ok("inclusion index=%d size=%d (%d hashes)", index, cp.size, len(proof))

		case "consistency":
			if len(args) < 2 {
				usage("line %d: consistency <m> <root m> <proof hash>...", lineNo)
			}
			m, err := strconv.ParseInt(args[0], 10, 64)
			if err != nil {
				usage("line %d: m: %v", lineNo, err)
			}
			rootM, err := decodeHash(args[1])
			if err != nil {
				usage("line %d: root: %v", lineNo, err)
			}
			proof, err := decodeHashes(args[2:])
			if err != nil {
				usage("line %d: proof: %v", lineNo, err)
			}
			if !cpOK {
				fail("consistency from=%d: no verified checkpoint to check against", m)
				continue
			}
			if nLeaves >= 0 && m >= 1 && m <= nLeaves {
				// Go's own root of the first m leaves must be the one given.
				own, err := tlog.TreeHash(m, reader)
				if err != nil || own != rootM {
					fail("consistency from=%d: the given root %s is not the tree hash %s of the first %d leaves (%v)", m, rootM, own, m, err)
					continue
				}
			}
			if err := tlog.CheckTree(proof, cp.size, cp.root, m, rootM); err != nil {
				fail("consistency from=%d to=%d: %v", m, cp.size, err)
				continue
			}
			ok("consistency from=%d to=%d (%d hashes)", m, cp.size, len(proof))

		case "consistency-note":
			if len(args) < 1 {
				usage("line %d: consistency-note <file> <proof hash>...", lineNo)
			}
			msg, err := os.ReadFile(args[0])
			if err != nil {
				usage("line %d: %v", lineNo, err)
			}
			proof, err := decodeHashes(args[1:])
			if err != nil {
				usage("line %d: proof: %v", lineNo, err)
			}
			if !cpOK {
				fail("consistency-note: no verified checkpoint to check against")
				continue
			}
			old, err := openCheckpoint(msg, verifier)
			if err != nil {
				fail("consistency-note: older checkpoint: %v", err)
				continue
			}
			if old.origin != cp.origin {
				fail("consistency-note: origin %q is not %q", old.origin, cp.origin)
				continue
			}
			if err := tlog.CheckTree(proof, cp.size, cp.root, old.size, old.root); err != nil {
				fail("consistency-note from=%d to=%d: %v", old.size, cp.size, err)
				continue
			}
			ok("consistency-note: signed checkpoint of size %d is a prefix of size %d (%d hashes)", old.size, cp.size, len(proof))

		case "receipt":
			if len(args) != 2 {
				usage("line %d: receipt <file> <leaf hash>", lineNo)
			}
			text, err := os.ReadFile(args[0])
			if err != nil {
				usage("line %d: %v", lineNo, err)
			}
			leaf, err := decodeHash(args[1])
			if err != nil {
				usage("line %d: leaf: %v", lineNo, err)
			}
			index, proof, cpNote, err := parseReceipt(text)
			if err != nil {
				fail("receipt %s: %v", args[0], err)
				continue
			}
			rcp, err := openCheckpoint(cpNote, verifier)
			if err != nil {
				fail("receipt index=%d: checkpoint: %v", index, err)
				continue
			}
			if err := tlog.CheckRecord(proof, rcp.size, rcp.root, index, leaf); err != nil {
				fail("receipt index=%d size=%d: %v", index, rcp.size, err)
				continue
			}
			same := ""
			if cpOK && rcp == cp {
				same = ", same checkpoint"
			}
			ok("receipt index=%d size=%d (%d hashes%s)", index, rcp.size, len(proof), same)

		default:
			usage("line %d: unknown check %q", lineNo, kind)
		}
	}
	if err := sc.Err(); err != nil {
		usage("reading spec: %v", err)
	}
	if verifier == nil || !haveCp {
		usage("the spec needs a vkey line and a checkpoint line")
	}
	if failed {
		os.Exit(1)
	}
}
