//! Byte grammars, and which tokens of a vocabulary can continue a stream under one.
//!
//! A [`ByteGrammar`] is an automaton over bytes whose every reachable state can still be
//! completed into a valid stream (no dead ends). [`TokenTrie`] holds a vocabulary's tokens as
//! byte strings; [`TokenTrie::allowed`] walks them from a state depth-first, so the bytes that
//! tokens share as a prefix are stepped once and a byte the grammar rejects prunes every token
//! that starts with it. Constrained sampling masks every token the walk does not reach.

/// An automaton over the bytes of a codec stream.
///
/// Implementations keep the invariant that makes constrained sampling total: from every state
/// [`step`](ByteGrammar::step) accepted, some continuation of bytes reaches a state where
/// [`complete`](ByteGrammar::complete) holds.
pub trait ByteGrammar {
    type State: Copy;

    /// The state before the first byte of a stream.
    fn start(&self) -> Self::State;

    /// Consumes one byte. False when no valid stream continues with it; `state` is then
    /// unspecified and must not be used again.
    fn step(&self, state: &mut Self::State, byte: u8) -> bool;

    /// True when the stream may end here: the sampler allows EOS (the only choice where no
    /// byte is accepted, as after a JPEG's EOI).
    fn complete(&self, state: &Self::State) -> bool;

    /// Consumes `bytes` from `state`; the state after them, or `None` at the first rejected byte.
    fn walk(&self, mut state: Self::State, bytes: &[u8]) -> Option<Self::State> {
        for &b in bytes {
            if !self.step(&mut state, b) {
                return None;
            }
        }
        Some(state)
    }
}

/// Byte strings as a trie: node 0 is the root, each node's children sorted by byte.
#[derive(Clone, Debug)]
pub struct ByteTrie {
    children: Vec<Vec<(u8, u32)>>,
}

impl Default for ByteTrie {
    fn default() -> Self {
        ByteTrie {
            children: vec![Vec::new()],
        }
    }
}

impl ByteTrie {
    /// Inserts `bytes`; returns the node where they end (the root for no bytes).
    pub fn insert(&mut self, bytes: &[u8]) -> usize {
        let mut node = 0usize;
        for &b in bytes {
            node = match self.children[node].binary_search_by_key(&b, |c| c.0) {
                Ok(i) => self.children[node][i].1 as usize,
                Err(i) => {
                    let new = self.children.len();
                    self.children[node].insert(i, (b, new as u32));
                    self.children.push(Vec::new());
                    new
                }
            };
        }
        node
    }

    /// The child of `node` along `byte`.
    #[inline]
    pub fn child(&self, node: usize, byte: u8) -> Option<usize> {
        let c = &self.children[node];
        c.binary_search_by_key(&byte, |c| c.0)
            .ok()
            .map(|i| c[i].1 as usize)
    }

    /// The children of `node`: (byte, node), sorted by byte.
    pub fn children(&self, node: usize) -> &[(u8, u32)] {
        &self.children[node]
    }

    /// Nodes, the root included.
    pub fn nodes(&self) -> usize {
        self.children.len()
    }
}

/// A vocabulary's tokens as a trie of their bytes. Tokens with no bytes (special tokens) are
/// not in it.
#[derive(Clone, Debug)]
pub struct TokenTrie {
    trie: ByteTrie,
    /// Tokens whose bytes end at each node.
    ends: Vec<Vec<u32>>,
    tokens: usize,
}

impl TokenTrie {
    /// `tokens[id]` is token `id`'s bytes (empty for a special token).
    pub fn new<T: AsRef<[u8]>>(tokens: &[T]) -> TokenTrie {
        let mut trie = ByteTrie::default();
        let mut ends: Vec<Vec<u32>> = Vec::new();
        let mut n = 0;
        for (id, bytes) in tokens.iter().enumerate() {
            let bytes = bytes.as_ref();
            if bytes.is_empty() {
                continue;
            }
            let node = trie.insert(bytes);
            ends.resize(trie.nodes(), Vec::new());
            ends[node].push(id as u32);
            n += 1;
        }
        ends.resize(trie.nodes(), Vec::new());
        TokenTrie {
            trie,
            ends,
            tokens: n,
        }
    }

    /// Tokens in the trie (those with at least one byte).
    pub fn len(&self) -> usize {
        self.tokens
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }

    /// Nodes of the trie, root included: the most byte steps one [`allowed`](Self::allowed)
    /// walk takes.
    pub fn nodes(&self) -> usize {
        self.trie.nodes()
    }

    /// Calls `visit(token, state after its bytes)` for every token the grammar accepts from
    /// `state`, in no particular order. Bytes shared by tokens are stepped once.
    pub fn allowed<G: ByteGrammar>(
        &self,
        grammar: &G,
        state: &G::State,
        visit: &mut dyn FnMut(u32, &G::State),
    ) {
        let mut stack: Vec<(u32, G::State)> = Vec::with_capacity(64);
        stack.push((0, *state));
        while let Some((node, st)) = stack.pop() {
            for &(byte, child) in self.trie.children(node as usize) {
                let mut next = st;
                if grammar.step(&mut next, byte) {
                    for &t in &self.ends[child as usize] {
                        visit(t, &next);
                    }
                    if !self.trie.children(child as usize).is_empty() {
                        stack.push((child, next));
                    }
                }
            }
        }
    }
}

/// A byte grammar over a vocabulary's tokens: which token ids may come next after a sequence
/// of ids (EOS where the stream may end), what constrained samplers mask with. Special tokens
/// (no bytes) other than EOS are never allowed and consume nothing.
pub struct TokenGrammar<G: ByteGrammar> {
    grammar: G,
    trie: TokenTrie,
    /// Token id -> bytes (empty for special tokens).
    tokens: Vec<Vec<u8>>,
    eos: u32,
}

impl<G: ByteGrammar> TokenGrammar<G> {
    /// `tokens[id]`: token `id`'s bytes (empty for special tokens); `eos`: the end token.
    pub fn new(grammar: G, tokens: Vec<Vec<u8>>, eos: u32) -> TokenGrammar<G> {
        TokenGrammar {
            trie: TokenTrie::new(&tokens),
            grammar,
            tokens,
            eos,
        }
    }

    pub fn grammar(&self) -> &G {
        &self.grammar
    }

    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    pub fn eos(&self) -> u32 {
        self.eos
    }

    /// The state after `ids` (special tokens have no bytes), or the byte where they break the
    /// grammar.
    pub fn walk(&self, ids: &[u32]) -> Result<G::State, usize> {
        let mut st = self.grammar.start();
        let mut at = 0;
        for &id in ids {
            for &b in self.bytes(id) {
                if !self.grammar.step(&mut st, b) {
                    return Err(at);
                }
                at += 1;
            }
        }
        Ok(st)
    }

    fn bytes(&self, id: u32) -> &[u8] {
        self.tokens.get(id as usize).map_or(&[][..], Vec::as_slice)
    }

    /// Sets `allowed[id]` for every token that may follow `state` (EOS when the stream may
    /// end there); ids at or past `allowed.len()` are left out. False when none may.
    pub fn mask(&self, state: &G::State, allowed: &mut [bool]) -> bool {
        allowed.fill(false);
        let mut any = false;
        if self.grammar.complete(state) {
            if let Some(a) = allowed.get_mut(self.eos as usize) {
                *a = true;
                any = true;
            }
        }
        self.trie.allowed(&self.grammar, state, &mut |t, _| {
            if let Some(a) = allowed.get_mut(t as usize) {
                *a = true;
                any = true;
            }
        });
        any
    }

    /// The tokens (ids, sorted) `state` allows next, EOS included when the stream is complete.
    pub fn allowed_after(&self, state: &G::State) -> Vec<u32> {
        let mut out = Vec::new();
        self.trie
            .allowed(&self.grammar, state, &mut |t, _| out.push(t));
        if self.grammar.complete(state) {
            out.push(self.eos);
        }
        out.sort_unstable();
        out
    }

    /// Consumes token `id` from `state`; false (the state then unusable) when the grammar
    /// rejects it. EOS consumes nothing and is accepted where the stream may end.
    pub fn advance(&self, state: &mut G::State, id: u32) -> bool {
        if id == self.eos {
            return self.grammar.complete(state);
        }
        self.bytes(id).iter().all(|&b| self.grammar.step(state, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Streams of the form `a+ b` (then complete).
    struct AsThenB;

    impl ByteGrammar for AsThenB {
        /// 0: nothing yet, 1: at least one `a`, 2: done.
        type State = u8;
        fn start(&self) -> u8 {
            0
        }
        fn step(&self, s: &mut u8, b: u8) -> bool {
            match (*s, b) {
                (0 | 1, b'a') => *s = 1,
                (1, b'b') => *s = 2,
                _ => return false,
            }
            true
        }
        fn complete(&self, s: &u8) -> bool {
            *s == 2
        }
    }

    fn allowed(trie: &TokenTrie, s: u8) -> Vec<(u32, u8)> {
        let mut out = Vec::new();
        trie.allowed(&AsThenB, &s, &mut |t, st| out.push((t, *st)));
        out.sort();
        out
    }

    #[test]
    fn walks_tokens_through_the_grammar() {
        let tokens: Vec<&[u8]> = vec![b"a", b"b", b"", b"aa", b"ab", b"ba", b"aab", b"c"];
        let trie = TokenTrie::new(&tokens);
        assert_eq!(trie.len(), 7);
        // Start: only tokens of a's, possibly ending in b.
        assert_eq!(allowed(&trie, 0), vec![(0, 1), (3, 1), (4, 2), (6, 2)]);
        // After an a: b alone is fine too.
        assert_eq!(
            allowed(&trie, 1),
            vec![(0, 1), (1, 2), (3, 1), (4, 2), (6, 2)]
        );
        // Done: nothing continues.
        assert!(allowed(&trie, 2).is_empty());
        assert_eq!(AsThenB.walk(0, b"aab"), Some(2));
        assert_eq!(AsThenB.walk(0, b"ba"), None);
    }
}
